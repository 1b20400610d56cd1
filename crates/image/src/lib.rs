//! Guest image catalog, verified downloads into Lima's cache, and vmoat's own Debian image.
