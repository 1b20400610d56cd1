//! Finds the git worktree, its main worktree and git common dir, and derives the VM name.
