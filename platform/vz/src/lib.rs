//! Apple Virtualization.framework platform driver (macOS only).
