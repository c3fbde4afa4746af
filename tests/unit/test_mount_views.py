"""Bind mounts of a directory are views of a disk already listed, not disks: systemd's sandbox makes several."""

from __future__ import annotations

import pytest

from mcpresd.samplers.host import mount_views

# mcpresd.service's sandbox on an ext4 root: PrivateTmp=, StateDirectory= under ProtectSystem=strict, and
# ProtectHome=read-only with /home on the root file system; /data is a disk of its own.
SANDBOXED = """\
1200 1100 259:2 / / ro,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
1201 1200 259:3 / /data ro,relatime shared:2 - xfs /dev/nvme1n1 rw
1202 1200 0:25 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755
1203 1200 259:2 /tmp/systemd-private-4f0c-mcpresd.service-Xa1b2c/tmp /tmp rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
1204 1200 259:2 /var/tmp/systemd-private-4f0c-mcpresd.service-Yd3e4f/tmp /var/tmp rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
1205 1200 259:2 /var/lib/private/mcpresd /var/lib/private/mcpresd rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
1206 1200 259:2 /home /home ro,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
1207 1200 259:3 /scratch\\040space /mnt/scratch\\040space rw - xfs /dev/nvme1n1 rw
"""

# Ubuntu on btrfs: / and /home are subvolumes (@, @home) of one file system, its top level mounted too.
BTRFS = """\
30 1 0:27 /@ / rw,relatime shared:1 - btrfs /dev/sda2 rw,ssd,subvolid=256,subvol=/@
31 30 0:27 /@home /home rw,relatime shared:2 - btrfs /dev/sda2 rw,ssd,subvolid=257,subvol=/@home
32 30 0:27 / /mnt/pool rw,relatime shared:3 - btrfs /dev/sda2 rw,ssd,subvolid=5,subvol=/
33 30 0:27 /@/tmp/systemd-private-9-mcpresd.service-Z/tmp /tmp rw,relatime shared:1 - btrfs /dev/sda2 rw,ssd,subvolid=256,subvol=/@
"""

# A container: an overlay root, a volume from a host disk that is not mounted whole in here, and
# the bind-mounted /etc/hosts.
CONTAINER = """\
500 400 0:52 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
501 500 8:1 /var/lib/docker/volumes/data/_data /data rw,relatime - ext4 /dev/sda1 rw
502 500 8:1 /var/lib/docker/containers/abc/hosts /etc/hosts rw,relatime - ext4 /dev/sda1 rw
"""


@pytest.mark.parametrize(("mountinfo", "views"), [
    (SANDBOXED, {"/tmp", "/var/tmp", "/var/lib/private/mcpresd", "/home", "/mnt/scratch space"}),
    (BTRFS, {"/tmp"}),
    (CONTAINER, set()),
    ("", set()),
    ("garbage without the separator\n", set()),
])
def test_bind_mounts_of_a_directory_of_a_disk_mounted_whole_are_views(mountinfo: str, views: set[str]) -> None:
    assert mount_views(mountinfo) == views


def test_a_disk_of_its_own_and_the_root_are_never_views() -> None:
    assert not {"/", "/data", "/run"} & mount_views(SANDBOXED)
    assert not {"/", "/home", "/mnt/pool"} & mount_views(BTRFS)
