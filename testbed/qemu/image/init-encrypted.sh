#!/bin/sh
# /init of an encrypted image's boot stage (`testbed image build --encrypted`): the
# kernel runs this from the clear, measured initramfs as PID 1. It brings the VM up
# like the in-RAM image (same mounts, modules, NIC, guest agent) so that the VM can be
# attested, then waits for its root disk. The host hot-plugs that disk only after the
# attestation passed and the tenant's CryptoVM released its key (QEMU's LUKS layer
# decrypts it); the disk holds the root filesystem as a newc archive, unpacked into RAM
# here, and the VM switches root into it. Without a release it never gets past here.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb hostname -F /etc/hostname
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
$bb mount -t securityfs securityfs /sys/kernel/security
$bb mkdir -p /run /tmp /dev/pts
$bb mount -t tmpfs -o mode=0755 tmpfs /run
kver=$($bb uname -r)
while read -r module; do
    $bb insmod "/lib/modules/$kver/$module" || echo "testbed-init: cannot load $module"
done < /etc/testbed/modules
$bb ip link set lo up
$bb ip link set eth0 up
$bb ip addr add 10.0.2.15/24 dev eth0
port=$($bb cat /etc/testbed/agent_port)
wait_s=$($bb cat /etc/testbed/root_wait)

stop() {
    echo "testbed-init: $1; powering off"
    echo o > /proc/sysrq-trigger
    $bb sleep 5
}

echo "testbed-init: boot stage up $($bb cut -d' ' -f1 /proc/uptime) s, starting the guest agent on port $port; waiting for the root disk"
/usr/bin/python3 -u /opt/testbed/guest_agent.py --listen "0.0.0.0:$port" --tpm /dev/tpmrm0 \
    --event-log /sys/kernel/security/tpm0/binary_bios_measurements &
agent=$!
waited=0
while [ ! -b /dev/vda ]; do
    $bb kill -0 "$agent" 2>/dev/null || stop "the guest agent exited"
    [ "$waited" -ge "$wait_s" ] && stop "REFUSED (no-root-release): no root disk within $wait_s s, the root filesystem stays encrypted"
    $bb sleep 1
    waited=$((waited + 1))
done
# A disk whose first bytes are a LUKS header reached us without its key: QEMU only
# decrypts a disk whose key the CryptoVM released. Stay in the boot stage (the agent
# still answers, so a verifier sees what booted) and never unpack ciphertext.
if [ "$($bb dd if=/dev/vda bs=4 count=1 2>/dev/null)" = "LUKS" ]; then
    echo "testbed-init: REFUSED (root-still-encrypted): the root disk is LUKS ciphertext, no key was released for this boot; the root filesystem stays sealed"
    wait "$agent"
    stop "the guest agent exited"
fi
$bb kill "$agent"
wait "$agent"
$bb mkdir -p /newroot
$bb mount -t tmpfs -o mode=0755 tmpfs /newroot
(cd /newroot && $bb cpio -i -d -m -H newc < /dev/vda 2>/dev/null) \
    || stop "REFUSED (root-unreadable): the root disk holds no root filesystem archive"
[ -x /newroot/init ] || stop "REFUSED (root-unreadable): the root filesystem has no /init"
echo "testbed-init: root filesystem $($bb cat /newroot/etc/testbed/root-id) unpacked from the encrypted root disk; switching root"
$bb ip addr flush dev eth0
$bb umount /sys/kernel/security /sys /run /proc
$bb umount -l /dev
exec $bb switch_root /newroot /init
