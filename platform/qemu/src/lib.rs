//! qemu platform driver: argv, accel choice (kvm/hvf/tcg), QMP, virtiofsd, disks.
