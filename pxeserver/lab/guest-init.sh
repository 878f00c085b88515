#!/bin/busybox sh
# PID 1 of the lab's domU, both lives in one initrd, told apart by the kernel command line:
# lab.role=installer (what pxeserver's boot config starts): loads the Xen front-ends, gets a
# lease by DHCP, fetches its preseed from url=, writes the installed system (the disk image at
# lab.disk=) onto xvda, calls the install-complete URL the preseed carries and powers off.
# lab.role=installed (what the disk's grub.cfg starts, through pygrub): prints its marker and
# powers off. Every wait is bounded; any failure prints one line and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mkdir -p /tmp
say() { echo "pxeserver-lab: $*"; }
fail() { say "FAILED: $*"; sync; poweroff -f; }
role="" url="" disk=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        lab.role=*) role=${word#lab.role=} ;;
        lab.disk=*) disk=${word#lab.disk=} ;;
        url=*) url=${word#url=} ;;
    esac
done

if [ "$role" = installed ]; then
    say "installed system up on $(uname -r)"
    poweroff -f
fi
[ "$role" = installer ] || fail "no lab.role= on the command line"

insmod /lib/modules/xen-netfront.ko || fail "insmod xen-netfront"
insmod /lib/modules/xen-blkfront.ko || fail "insmod xen-blkfront"
tries=0
while [ ! -e /sys/class/net/eth0 ] || [ ! -e /dev/xvda ]; do
    tries=$((tries + 1)); [ $tries -le 60 ] || fail "no eth0 or xvda after 60 s"; sleep 1
done
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 3 -s /udhcpc.script || fail "no DHCP lease"
say "lease $(ip -4 -o addr show eth0 | awk '{print $4}')"

[ -n "$url" ] || fail "no url= (preseed) on the command line"
wget -q -O /tmp/preseed "$url" || fail "preseed $url"
say "preseed $url: $(wc -c < /tmp/preseed) bytes"
callback=$(sed -n "s/.*curl -fsS -X POST '\([^']*\)'.*/\1/p" /tmp/preseed)
[ -n "$callback" ] || fail "the preseed names no install-complete URL"

[ -n "$disk" ] || fail "no lab.disk= on the command line"
wget -q -O /tmp/disk.img "$disk" || fail "downloading $disk"
dd if=/tmp/disk.img of=/dev/xvda bs=1M conv=fsync 2>/dev/null || fail "writing $disk to xvda"
rm /tmp/disk.img
say "installed system written to xvda from $disk"

wget -q -O /tmp/callback --post-data "done=1" "$callback" || fail "install-complete call $callback"
say "install-complete call answered: $(cat /tmp/callback)"
sync
poweroff -f
