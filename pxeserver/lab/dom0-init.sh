#!/bin/sh
# PID 1 of the lab's Xen dom0 (kernel argument init=/sbin/lab-init): brings up Xen's daemons and
# the bridge the domUs are on, installs pypxeboot as the README says, runs the scenario from the lab disk (label "lab", written by the
# host for each run), keeps the Xen logs there and powers the machine off. Every wait is bounded.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "lab-dom0: $(date +%T) $*" > /dev/console; }
finish() {
    say "$1"
    [ -d /lab/out ] && { cp -a /var/log/xen /lab/out/ 2>/dev/null; echo "$1" > /lab/out/dom0-result; }
    sync; umount /lab 2>/dev/null; sync
    poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/xen /var/log/xen/console
hostname dom0
say "kernel $(uname -r) up"

/lib/systemd/systemd-udevd --daemon
udevadm trigger --action=add
udevadm settle --timeout=60
modprobe -a xen-netback xen-blkback loop bridge

mkdir -p /lab
mount LABEL=lab /lab || finish "no lab disk"
mkdir -p /lab/out
. /lab/lab.env   # DOM0_ADDRESS (CIDR), SERVER_IP, PYPXEBOOT_SHA256

nic=""
for path in /sys/class/net/*; do
    name=${path##*/}
    [ "$name" = lo ] || [ -e "$path/bridge" ] || [ ! -e "$path/device" ] || { nic=$name; break; }
done
[ -n "$nic" ] || finish "no network interface"
ip link add xenbr0 type bridge
ip link set xenbr0 type bridge forward_delay 0 stp_state 0
ip link set "$nic" master xenbr0
ip link set "$nic" up
ip link set xenbr0 up
ip addr add "$DOM0_ADDRESS" dev xenbr0
ip link set lo up
say "$nic bridged into xenbr0 as $DOM0_ADDRESS"
# The README's dom0 set-up: pypxeboot from the server, checked against the SHA-256 that
# `pxeserver build-pypxeboot --print-sha256` printed on the server's side.
curl -fsS --max-time 120 -o /usr/local/bin/pypxeboot "http://$SERVER_IP/dom0/pypxeboot" \
    || finish "curl http://$SERVER_IP/dom0/pypxeboot failed"
chmod 755 /usr/local/bin/pypxeboot
sha256sum /usr/local/bin/pypxeboot > /lab/out/pypxeboot.sha256
[ "$(cut -d' ' -f1 /lab/out/pypxeboot.sha256)" = "$PYPXEBOOT_SHA256" ] \
    || finish "pypxeboot from /dom0/pypxeboot is not what build-pypxeboot builds: $(cat /lab/out/pypxeboot.sha256)"
say "pypxeboot installed from http://$SERVER_IP/dom0/pypxeboot, SHA-256 as build-pypxeboot prints it"
# Modules are loaded and devtmpfs makes the nodes; udevd's rule runs on each new backend device
# would only compete with Xen's hotplug scripts, which libxl kills after 40 s.
udevadm control --exit

/etc/init.d/xen start > /lab/out/xen-start.log 2>&1 || finish "xen did not start: $(tail -3 /lab/out/xen-start.log)"
xl info > /lab/out/xl-info.txt 2>&1
say "xen started"

sh /lab/scenario.sh > /lab/out/scenario.log 2>&1
finish "scenario ended with status $?"
