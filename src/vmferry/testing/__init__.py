"""
The test harness: real ``vmferryd`` processes and the test guest, for the
tests, ``make demo`` and the benchmarks (outside the layers, like
:mod:`vmferry.testguest`).

- :class:`Host` / :func:`hosts`: daemons with their own state dir, socket
  and config; everything they started is killed on the way out.
- :func:`wait_heartbeat` / :func:`poll_heartbeat`: the guest's newest
  heartbeat, sync or async; :func:`boot_guest` defines, starts and waits.
- :mod:`vmferry.testing.cluster`: a real etcd on loopback (:func:`etcd_server`),
  :func:`poll`, and :func:`try_create` for a domain whose lease may be held elsewhere.
- :mod:`vmferry.testing.fakemonitor`: a stand-in for QEMU's monitor in
  pure-logic unit tests.
- :mod:`vmferry.testing.disk`: the test guest's disk from the host: images
  for it, :func:`~vmferry.testing.disk.wait_disk_ready`, the offline
  verifier of what it wrote, ``qemu-img compare``.
- :mod:`vmferry.testing.stray`: what a daemon that died leaves behind (a QEMU
  started behind its back, a domain's status record), for restart tests.
"""

from vmferry.testing.daemons import Host, allocate_ports, hosts, kill_qemu, qemu_pids
from vmferry.testing.heartbeat import boot_guest, poll_heartbeat, wait_heartbeat

__all__ = [
    "Host",
    "allocate_ports",
    "boot_guest",
    "hosts",
    "kill_qemu",
    "poll_heartbeat",
    "qemu_pids",
    "wait_heartbeat",
]
