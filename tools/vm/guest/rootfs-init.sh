#!/bin/sh
# /sbin/init of the cowd base image (tools/mkbase): the work a VM's first boot does to its
# root disk, then one marker line on the console and power off.
#
# Every boot: count itself (/var/lib/cowd/boots), append to /var/log/cowd-boot.log, write a
# file of random data (/var/lib/cowd/blob-N, BLOB_KIB KiB) and record its sha256.  The first
# boot also makes the machine's identity: /etc/machine-id and host keys from random data
# (/etc/ssh/ssh_host_*_key; random bytes stand in for key generation, the disk sees the same
# writes).  A later boot checks every earlier boot's blob against its recorded sum.
# The marker, printed only after everything is synced to the disk:
#   COWD-BOOT-OK boot=N machine-id=ID blob=/var/lib/cowd/blob-N sha256=HEX verified=K
# and on any failure a COWD-BOOT-FAIL line.  The root file system is remounted read-only
# before power-off, so it is clean (e2fsck) afterwards.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
BLOB_KIB=1024

mount -t proc proc /proc
mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -o remount,rw / 2>/dev/null

fail() {
    echo "COWD-BOOT-FAIL init: $*" >/dev/console
    sync
    mount -o remount,ro / 2>/dev/null
    poweroff -f
}

state=/var/lib/cowd
mkdir -p $state /var/log /etc/ssh || fail "mkdir"
n=$(cat $state/boots 2>/dev/null || echo 0)
n=$((n + 1))

if [ ! -s /etc/machine-id ]; then
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >/etc/machine-id || fail "machine-id"
    echo >>/etc/machine-id
    for t in rsa ecdsa ed25519; do
        key=/etc/ssh/ssh_host_${t}_key
        dd if=/dev/urandom of=$key bs=1024 count=2 2>/dev/null || fail "host key $t"
        chmod 600 $key
        sha256sum $key | cut -d' ' -f1 >$key.pub
    done
fi
mid=$(cat /etc/machine-id)

verified=0
k=1
while [ $k -lt $n ]; do
    want=$(cat $state/blob-$k.sha256 2>/dev/null)
    got=$(sha256sum $state/blob-$k 2>/dev/null | cut -d' ' -f1)
    [ -n "$want" ] && [ "$want" = "$got" ] || fail "blob-$k does not match its sum"
    verified=$((verified + 1))
    k=$((k + 1))
done

blob=$state/blob-$n
dd if=/dev/urandom of=$blob bs=1024 count=$BLOB_KIB 2>/dev/null || fail "write $blob"
sum=$(sha256sum $blob | cut -d' ' -f1)
echo "$sum" >$blob.sha256
echo "boot $n machine-id $mid uptime $(cut -d' ' -f1 /proc/uptime) blob $sum" \
    >>/var/log/cowd-boot.log
echo $n >$state/boots
sync || fail "sync"
echo "COWD-BOOT-OK boot=$n machine-id=$mid blob=$blob sha256=$sum verified=$verified" \
    >/dev/console
umount /run 2>/dev/null
mount -o remount,ro / || fail "remount read-only"
poweroff -f
