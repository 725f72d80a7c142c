#!/bin/busybox sh
# /init of the tiny initramfs tools/mkbase builds (busybox + the modules the root disk needs).
# Its one job: load virtio_blk and ext4 (in the order tools/mkbase computed with modprobe
# --show-depends, one file name a line in /etc/modules.order), find the root= device, mount
# it and switch_root to its /sbin/init.  Any failure prints one COWD-BOOT-FAIL line on the
# console and powers off, so a boot never hangs waiting for a human.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

fail() {
    echo "COWD-BOOT-FAIL initramfs: $*" >/dev/console
    poweroff -f
}

while read -r mod; do
    # crc32c-intel needs SSE4.2, which qemu's TCG CPU may not offer: crc32c_generic follows.
    insmod "/lib/modules/$mod" 2>/dev/null || case $mod in
        crc32c-intel.ko) ;;
        *) fail "insmod $mod failed" ;;
    esac
done </etc/modules.order

root=; rootfstype=ext4; rootflags=rw; wait_s=30
for arg in $(cat /proc/cmdline); do
    case $arg in
        root=*) root=${arg#root=} ;;
        rootfstype=*) rootfstype=${arg#rootfstype=} ;;
        ro) rootflags=ro ;;
        rw) rootflags=rw ;;
        rootwait=*) wait_s=${arg#rootwait=} ;;
    esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"

i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ $i -gt $((wait_s * 10)) ] && fail "root device $root did not appear in ${wait_s} s"
    usleep 100000
done
mount -t "$rootfstype" -o "$rootflags" "$root" /newroot || fail "mount $root failed"
[ -x /newroot/sbin/init ] || fail "$root has no executable /sbin/init"
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /sys
umount /proc
exec switch_root /newroot /sbin/init
