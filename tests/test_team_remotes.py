"""Shared DVC storage: a directory remote (NFS-style), an SSH remote on a real sshd, verify, group permissions.

The guarantees of the README's "Team setup": after ``dvc push --run-cache`` from one clone, a
fresh clone's ``dvc pull --run-cache && dvc repro`` runs nothing and every output is byte-identical;
a remote with ``verify true`` refuses a corrupt object on pull; a cache with ``cache.shared group``
stays usable by the whole group.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from helpers_team import (VENV_BIN, cache_objects, copy_project, dvc, free_port, git, kill_group, md5_file, run,
                      set_params, tool_env, wait_for)
from pipeline.data.tensors import load_split
from pipeline.errors import DataError

pytestmark = pytest.mark.slow

STAGES = ("download", "clean", "preprocess", "augment", "evaluator", "train", "evaluate", "report")


def output_files(project: Path) -> dict[str, bytes]:
    """Every file of every output dvc.lock records (cached or not), by path relative to the project."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    out: dict[str, bytes] = {}
    for stage in lock["stages"].values():
        for o in stage.get("outs", []):
            path = project / o["path"]
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            assert files, f"output {o['path']} is missing"
            for f in files:
                out[f.relative_to(project).as_posix()] = f.read_bytes()
    return out


def assert_repro_runs_nothing(clone: Path) -> None:
    """Nothing but the inputs stage (always run: it fingerprints data.path, milliseconds) runs."""
    repro = dvc("repro", cwd=clone)
    assert re.findall(r"Running stage '([\w-]+)'", repro.stdout) == ["inputs"], repro.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout, repro.stdout


def clone(origin: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", origin, dest], origin.parent)
    return dest


@pytest.fixture(scope="module")
def origin(built_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Alice's clone: the built project; its outputs are the reference every pull must reproduce."""
    return copy_project(built_project, tmp_path_factory.mktemp("alice") / "project")


# ---------------------------------------------------------------------------------------------
# A shared directory (an NFS mount, in real life)
# ---------------------------------------------------------------------------------------------


def test_directory_remote_push_run_cache_then_fresh_clone_pull_and_repro_runs_nothing(
        origin: Path, tmp_path: Path) -> None:
    store = tmp_path / "nfs" / "dvc-store"
    dvc("remote", "add", "-d", "shared", str(store), cwd=origin)
    dvc("remote", "modify", "shared", "verify", "true", cwd=origin)
    # Alice also tried report.grid_nrow=4 and did not commit it: only the run cache records it.
    # `--run-cache` sends run records, not outputs; her push while they are in the workspace does.
    set_params(origin, {"report": {"grid_nrow": 4}})
    dvc("repro", cwd=origin)
    tried = output_files(origin)
    dvc("push", "--run-cache", cwd=origin)
    git("checkout", "HEAD", "--", "params.yaml", "dvc.lock", cwd=origin)  # autostage staged the lock
    dvc("checkout", "--force", cwd=origin)
    git("commit", "-q", "-am", "team remote", cwd=origin)
    dvc("push", "--run-cache", cwd=origin)
    reference = output_files(origin)

    bob = clone(origin, tmp_path / "bob")
    assert not (bob / "models" / "best.pt").exists()
    dvc("pull", "--run-cache", cwd=bob)
    assert_repro_runs_nothing(bob)
    assert output_files(bob) == reference

    # Bob sets the value Alice tried: the run cache restores her outputs instead of re-running
    # (`--pull` fetches the outputs of a run-cache hit that his clone does not have yet).
    set_params(bob, {"report": {"grid_nrow": 4}})
    repro = dvc("repro", "--pull", cwd=bob)
    assert "Stage 'report' is cached - skipping run, checking out outputs" in repro.stdout, repro.stdout
    assert re.findall(r"Running stage '([\w-]+)'", repro.stdout) == ["inputs"], repro.stdout
    assert output_files(bob) == tried


def test_remote_with_verify_refuses_a_corrupt_object_on_pull(origin: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    dvc("remote", "add", "-f", "-d", "corruptible", str(store), cwd=origin)
    git("commit", "-q", "-am", "remote", cwd=origin)
    dvc("push", cwd=origin)
    shard = origin / "data" / "tensors" / "train_000.npy"
    digest = md5_file(shard)
    obj = store / "files" / "md5" / digest[:2] / digest[2:]
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit: the remote's disk rotted
    obj.write_bytes(bytes(data))

    # Control, verify off (DVC's default): the rotten object is pulled and checked out as if fine,
    # and `dvc status` sees nothing wrong; only the pipeline's own hash check stops training on it.
    trusting = clone(origin, tmp_path / "trusting")
    dvc("pull", cwd=trusting)
    assert md5_file(trusting / "data" / "tensors" / "train_000.npy") != digest
    # Nothing but the inputs stage, which is always run (it fingerprints data.path).
    assert dvc("status", cwd=trusting).stdout.split() == ["inputs:", "always", "changed"]
    with pytest.raises(DataError, match="train_000.npy: content hash"):
        load_split(trusting / "data" / "tensors", "train")

    # verify true (README: Team setup): the pull fails and the bad object goes nowhere.
    careful = clone(origin, tmp_path / "careful")
    dvc("remote", "modify", "--local", "corruptible", "verify", "true", cwd=careful)
    pulled = dvc("pull", cwd=careful, check=False)
    assert pulled.returncode != 0
    assert "data/tensors" in pulled.stderr + pulled.stdout
    assert not (careful / "data" / "tensors" / "train_000.npy").exists()
    assert not (careful / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]).exists()
    bad = [o for o in cache_objects(careful / ".dvc" / "cache")
           if md5_file(o) != o.parent.name + o.name.removesuffix(".dir")]
    assert not bad


def test_shared_cache_for_a_group_is_group_readable_and_writable(origin: Path, tmp_path: Path) -> None:
    project = copy_project(origin, tmp_path / "project")
    shared = tmp_path / "shared-cache"
    dvc("cache", "dir", str(shared), cwd=project)
    dvc("config", "cache.shared", "group", cwd=project)
    # The team umask (README): group members may read and write what the stages write.
    proc = subprocess.run([str(VENV_BIN / "dvc"), "repro", "--force", "--single-item", "download"], cwd=project, env=tool_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o002))
    assert proc.returncode == 0, proc.stderr[-3000:]

    objects = cache_objects(shared)
    assert objects
    for obj in objects:
        mode = stat.S_IMODE(obj.stat().st_mode)
        assert mode & stat.S_IRGRP, f"{obj} is {oct(mode)}: not group-readable"
    for d in {o.parent for o in objects} | {shared / "files" / "md5"}:
        mode = stat.S_IMODE(d.stat().st_mode)
        # rwx for the group, and setgid so new objects keep the cache's group.
        assert mode & 0o2070 == 0o2070, f"{d} is {oct(mode)}: teammates could not add objects"
    # What the stage itself wrote honours the umask (not mkstemp's private 0600 / 0700).
    raw = project / "data" / "raw"
    assert stat.S_IMODE(raw.stat().st_mode) == 0o775
    assert stat.S_IMODE((raw / "source.json").stat().st_mode) == 0o664


# ---------------------------------------------------------------------------------------------
# SSH: a real OpenSSH server on 127.0.0.1
# ---------------------------------------------------------------------------------------------


class Sshd:
    """OpenSSH's sshd on 127.0.0.1 and a high port, key authentication only, started by the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.host_key = root / "host_ed25519"
        self.client_key = root / "client_ed25519"
        for key in (self.host_key, self.client_key):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], root)
        (root / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", f"PidFile {root / 'sshd.pid'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",  # the CI machine runs tests as root
            "StrictModes no",  # the key files live in a pytest temp dir
            "UsePAM no", "Subsystem sftp internal-sftp", "",
        ]))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        sshd = "/usr/sbin/sshd"
        assert Path(sshd).is_file(), "sshd is missing: install Debian's openssh-server (see README: Team setup)"
        if os.geteuid() == 0:
            # Privilege separation needs this directory when sshd runs as root; the Debian package
            # creates it at boot through systemd, which a container does not run.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        run([sshd, "-t", "-f", self.config], self.root)  # config check, with sshd's own message
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "sshd.log", "wb"), start_new_session=True)  # noqa: SIM115
        wait_for(self._listening, 30, f"sshd on port {self.port} (log: {self.root / 'sshd.log'})", 0.1)

    def _listening(self) -> bool:
        import socket  # noqa: PLC0415

        assert self.proc is not None and self.proc.poll() is None, (self.root / "sshd.log").read_text()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, signal.SIGTERM)  # sshd and any connection it forked
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


def _ssh_user() -> str:
    import pwd  # noqa: PLC0415

    return pwd.getpwuid(os.geteuid()).pw_name


def test_ssh_remote_push_run_cache_then_fresh_clone_pull_and_repro_runs_nothing(
        origin: Path, sshd: Sshd, tmp_path: Path) -> None:
    store = tmp_path / "ssh-store"
    store.mkdir()
    url = f"ssh://{_ssh_user()}@127.0.0.1:{sshd.port}{store}"
    dvc("remote", "add", "-f", "-d", "team", url, cwd=origin)
    dvc("remote", "modify", "team", "verify", "true", cwd=origin)
    git("commit", "-q", "-am", "ssh remote", cwd=origin)
    dvc("remote", "modify", "--local", "team", "keyfile", str(sshd.client_key), cwd=origin)  # per user
    dvc("push", "--run-cache", cwd=origin)
    assert cache_objects(store) and (store / "runs").is_dir()
    reference = output_files(origin)

    carol = clone(origin, tmp_path / "carol")
    dvc("remote", "modify", "--local", "team", "keyfile", str(sshd.client_key), cwd=carol)
    dvc("pull", "--run-cache", cwd=carol)
    assert_repro_runs_nothing(carol)
    assert output_files(carol) == reference


def test_dvc_ssh_remote_does_not_check_the_servers_host_key(origin: Path, sshd: Sshd, tmp_path: Path) -> None:
    """A documented limitation (README: Team setup), pinned so the docs change when DVC does.

    dvc-ssh passes ``known_hosts=None`` to asyncssh, which disables host key checking, and offers
    no setting to turn it on. OpenSSH refuses the same server when known_hosts says otherwise.
    """
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    impostor = tmp_path / "other_host_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", impostor], tmp_path)
    (home / ".ssh" / "known_hosts").write_text(
        f"[127.0.0.1]:{sshd.port} {impostor.with_suffix('.pub').read_text()}")
    env = tool_env(HOME=str(home))
    ssh = run(["ssh", "-i", sshd.client_key, "-p", str(sshd.port), "-o", "BatchMode=yes",
               "-o", f"UserKnownHostsFile={home / '.ssh' / 'known_hosts'}",  # OpenSSH ignores $HOME
               "-o", "StrictHostKeyChecking=yes", f"{_ssh_user()}@127.0.0.1", "true"], tmp_path, env=env, check=False)
    assert ssh.returncode != 0 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in ssh.stderr

    store = tmp_path / "store"
    store.mkdir()
    project = copy_project(origin, tmp_path / "project")
    dvc("remote", "add", "-f", "-d", "mitm", f"ssh://{_ssh_user()}@127.0.0.1:{sshd.port}{store}", cwd=project,
        env=env)
    dvc("remote", "modify", "--local", "mitm", "keyfile", str(sshd.client_key), cwd=project, env=env)
    pushed = dvc("push", cwd=project, env=env, check=False)
    assert pushed.returncode == 0, "dvc-ssh now checks host keys: update README 'Team setup' (SSH) and this test"
