#!/bin/bash
# Builds vmoat's Debian 13 "trixie" guest image from Debian's packages with mmdebstrap.
#
# vmoat embeds this directory in its binary, writes it to a temporary directory and runs this
# script there (`vmoat image build debian`); it can also be run by hand. Inputs, all required:
#   VMOAT_ARCH       Debian architecture: amd64 or arm64
#   VMOAT_MIRROR     Debian mirror URI (vmoat takes the one in the host's apt sources)
#   VMOAT_MODE       mmdebstrap mode: root, or unshare (rootless, user namespaces)
#   VMOAT_OUT        empty output directory: disk.qcow2, vmlinuz, initrd.img, build.env
#   VMOAT_FS_UUID    UUID of the root file system (vmoat derives it from the recipe hash)
# Optional: VMOAT_DISK_SIZE (default 4G), VMOAT_WORK (scratch dir, default $VMOAT_OUT/.work).
#
# Lines starting with "==> " name the stage that begins; vmoat shows them as progress.
# Nothing here adds a user, a key or an SSH host key: the cloud-init seed brings them.
set -euo pipefail

recipe=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${VMOAT_ARCH:?}" "${VMOAT_MIRROR:?}" "${VMOAT_MODE:?}" "${VMOAT_OUT:?}" "${VMOAT_FS_UUID:?}"
disk_size=${VMOAT_DISK_SIZE:-4G}
work=${VMOAT_WORK:-$VMOAT_OUT/.work}
suite=trixie

stage() { printf '==> %s\n' "$*"; }

case "$VMOAT_ARCH" in
    amd64) kernel_pkg=linux-image-amd64 ;;
    arm64) kernel_pkg=linux-image-arm64 ;;
    *) echo "build.sh: unknown VMOAT_ARCH '$VMOAT_ARCH' (amd64 or arm64)" >&2; exit 2 ;;
esac

# The package list without comments, comma-separated, plus the kernel of this arch.
packages=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$recipe/packages.txt" | tr -d ' \t' |
    paste -sd, -)
packages="$packages,$kernel_pkg"

# The paths the recipe's own files land on in the image. sync-in keeps the builder's owner and
# mode (a rootless build would leave /etc owned by the builder's uid), so a hook resets them.
owned=$(cd "$recipe/files" && find . -mindepth 1 -printf '/%P ')

mkdir -p "$work"
rm -rf "${work:?}"/rootfs "$work/rootfs.tar"

# Root mode writes a directory that mkfs.ext4 reads; unshare mode writes a tarball (its
# directory would belong to sub-uids), which mke2fs >= 1.47.1 reads directly.
if [ "$VMOAT_MODE" = root ]; then
    target="$work/rootfs"
else
    target="$work/rootfs.tar"
fi

stage "rootfs: mmdebstrap $suite $VMOAT_ARCH ($VMOAT_MODE mode) from $VMOAT_MIRROR"
mmdebstrap \
    --variant=minbase \
    --mode="$VMOAT_MODE" \
    --arch="$VMOAT_ARCH" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --include="$packages" \
    --customize-hook='echo "==> configure: files, networkd, no keys, no machine-id"' \
    --customize-hook="sync-in '$recipe/files' /" \
    --customize-hook="for p in $owned; do chown -h 0:0 \"\$1\$p\"; \
        if [ -d \"\$1\$p\" ]; then chmod 0755 \"\$1\$p\"; else chmod 0644 \"\$1\$p\"; fi; done" \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook=': > "$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log' \
    "$suite" "$target" \
    "deb $VMOAT_MIRROR $suite main" \
    "deb $VMOAT_MIRROR $suite-updates main"

stage "kernel: extracting the kernel and initrd for direct boot"
if [ "$VMOAT_MODE" = root ]; then
    kernel=$(find "$target/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n1)
    initrd=$(find "$target/boot" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -n1)
    cp "$kernel" "$VMOAT_OUT/vmlinuz"
    cp "$initrd" "$VMOAT_OUT/initrd.img"
else
    kernel=$(tar -tf "$target" | grep -E '^(\./)?boot/vmlinuz-' | sort -V | tail -n1)
    initrd=$(tar -tf "$target" | grep -E '^(\./)?boot/initrd\.img-' | sort -V | tail -n1)
    tar -xOf "$target" "$kernel" > "$VMOAT_OUT/vmlinuz"
    tar -xOf "$target" "$initrd" > "$VMOAT_OUT/initrd.img"
fi
if [ ! -s "$VMOAT_OUT/vmlinuz" ] || [ ! -s "$VMOAT_OUT/initrd.img" ]; then
    echo "build.sh: no kernel or initrd in the root file system ($kernel_pkg)" >&2
    exit 1
fi
chmod 0644 "$VMOAT_OUT/vmlinuz" "$VMOAT_OUT/initrd.img"
kernel_version=${kernel##*vmlinuz-}

stage "mkfs: whole-disk ext4 labelled vmoat-root ($disk_size)"
rm -f "$work/disk.raw"
truncate -s "$disk_size" "$work/disk.raw"
# Fixed UUID and hash seed: the same recipe gives the same file system identity.
mkfs.ext4 -q -F -L vmoat-root -U "$VMOAT_FS_UUID" -E "hash_seed=$VMOAT_FS_UUID" \
    -d "$target" "$work/disk.raw"

stage "qcow2: converting the raw disk"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$VMOAT_OUT/disk.qcow2"

# Facts vmoat records in the manifest (sizes of the intermediate raw image, versions).
{
    echo "raw_size=$(stat -c %s "$work/disk.raw")"
    echo "raw_used=$(( $(stat -c %b "$work/disk.raw") * $(stat -c %B "$work/disk.raw") ))"
    echo "kernel_version=$kernel_version"
    echo "suite=$suite"
} > "$VMOAT_OUT/build.env"

stage "cleanup: removing the scratch root file system"
rm -rf "${work:?}"
stage "done"
