//! In-process SSH to the guest with russh: keys, pinned host key, exec, PTY, forwards.
