//! The guest's Docker daemon through bollard, port discovery and the docker context.
