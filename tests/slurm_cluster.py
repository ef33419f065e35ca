"""A one-node SLURM cluster on localhost for the cluster tests (Debian's slurm-wlm and munge, started
by hand: no systemd). Every daemon it starts is stopped again by process id, also when a test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def tool(name: str) -> str | None:
    """Full path of a program: on PATH, or in /usr/sbin (daemons; not on every root PATH)."""
    found = shutil.which(name)
    return found or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "starting SLURM daemons needs root"
    for name in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "runuser"):
        if tool(name) is None:
            return f"{name} is not installed (scripts/setup.sh --test installs slurm-wlm and munge as root)"
    return None


def _config(folder: Path, host: str) -> str:
    return "\n".join(
        [
            "ClusterName=avatar-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=slurm",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"StateSaveLocation={folder}/state",
            f"SlurmdSpoolDir={folder}/spool",
            f"SlurmctldPidFile={folder}/slurmctld.pid",
            f"SlurmdPidFile={folder}/slurmd.pid",
            f"SlurmctldLogFile={folder}/slurmctld.log",
            f"SlurmdLogFile={folder}/slurmd.log",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=16000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pid: int | None) -> None:
    if not pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@contextlib.contextmanager
def local_cluster(timeout: float = 60.0):
    """Start munged, slurmctld and slurmd; yield the environment for SLURM clients (SLURM_CONF)."""
    import tempfile

    # the slurm user must reach its state folder: not under pytest's private (0700) temp folders
    folder = Path(tempfile.mkdtemp(prefix="avatar-slurm-"))
    host = socket.gethostname()
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, host))
    shutil.chown(folder / "state", "slurm", "slurm")
    shutil.chown(folder / "spool", "slurm", "slurm")
    os.chmod(folder, 0o755)
    munge_run = Path("/run/munge")
    munge_run.mkdir(exist_ok=True)
    shutil.chown(munge_run, "munge", "munge")
    munge_pidfile = munge_run / "avatar-test-munged.pid"  # munged writes it as the munge user
    munge_socket = munge_run / "munge.socket.2"
    pids: dict[str, int | None] = {}
    env = {**os.environ, "SLURM_CONF": str(conf)}
    # srun inside a batch job reads the default location, whatever SLURM_CONF says: link it there
    system_conf = Path("/etc/slurm/slurm.conf")
    system_conf.parent.mkdir(parents=True, exist_ok=True)
    saved = system_conf.with_name("slurm.conf.avatar-test-saved")
    if system_conf.exists() or system_conf.is_symlink():
        system_conf.rename(saved)
    system_conf.symlink_to(conf)
    try:
        subprocess.run(
            [
                tool("runuser"),
                "-u",
                "munge",
                "--",
                tool("munged"),
                "--pid-file",
                str(munge_pidfile),
                "--socket",
                str(munge_socket),
                "--force",
            ],
            check=True,
            timeout=30,
        )
        pids["munged"] = _pid(munge_pidfile)
        subprocess.run([tool("slurmctld"), "-f", str(conf)], check=True, timeout=30, env=env)
        subprocess.run([tool("slurmd"), "-f", str(conf)], check=True, timeout=30, env=env)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            pids["slurmctld"] = _pid(folder / "slurmctld.pid")
            pids["slurmd"] = _pid(folder / "slurmd.pid")
            state = subprocess.run(
                [tool("sinfo"), "-h", "-o", "%T"], capture_output=True, text=True, env=env
            ).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            time.sleep(0.5)
        else:
            logs = "\n".join(
                (folder / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log") if (folder / f).exists()
            )
            raise RuntimeError(f"the local SLURM node did not come up (state {state!r}):\n{logs}")
        yield env
    finally:
        pids["munged"] = pids.get("munged") or _pid(munge_pidfile)
        pids["slurmctld"] = pids.get("slurmctld") or _pid(folder / "slurmctld.pid")
        pids["slurmd"] = pids.get("slurmd") or _pid(folder / "slurmd.pid")
        for daemon in ("slurmd", "slurmctld", "munged"):
            _stop(pids.get(daemon))
        system_conf.unlink(missing_ok=True)
        if saved.exists() or saved.is_symlink():
            saved.rename(system_conf)
        shutil.rmtree(folder, ignore_errors=True)
