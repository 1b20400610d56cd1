//! Per-VM host agent: supervises the hypervisor, holds SSH, forwards and tunnels, serves ha.sock.
