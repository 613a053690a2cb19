"""A restore never holds more privilege than the placeholder it lands in, whatever the images say.

CRIU restores each task with the credentials recorded in its ``core-<tid>.img``, as the agent (root,
all capabilities) - not as the placeholder. So before a restore, independently of the manifest's MAC:

    decode    every ``core-*.img``: CRIU's image framing (the common magic, the image magic, then
              records of a u32 length and a protobuf message), and from ``core_entry.thread_core``
              (field 5) the ``creds`` (10: creds_entry) and ``seccomp_mode`` (11). A minimal protobuf
              wire decoder reads only those (CRIU's images/core.proto and creds.proto)
    allowed   the placeholder's init, from its own ``/proc/<pid>/status``: Uid/Gid/Groups,
              CapInh/CapPrm/CapEff/CapBnd/CapAmb, NoNewPrivs, Seccomp
    compare   (pure) every image thread against it: its user and group IDs among the placeholder's
              (any, with CAP_SETUID / CAP_SETGID in the placeholder's permitted set); its permitted,
              effective and ambient capabilities within the placeholder's permitted set, inheritable
              within the placeholder's inheritable and permitted, bounding within its bounding set;
              no_new_privs set where the placeholder's is; a seccomp mode at least the placeholder's

Anything more is refused, naming the thread, the field and both values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dynamo_snapshot.agent.container.criuimage import CORE_MAGIC, fields, ints, one, records
from dynamo_snapshot.agent.errors import ArtifactInvalid, RestoreExceedsPrivilege
from dynamo_snapshot.agent.host import procfs

MAX_CORE_BYTES = 4 << 20  # one thread's registers, signals, creds: a few KiB
CAP_SETGID, CAP_SETUID = 6, 7

# core_entry.thread_core, thread_core_entry.{creds, seccomp_mode}, creds_entry fields
_THREAD_CORE, _CREDS, _SECCOMP = 5, 10, 11
_UIDS, _GIDS = (1, 3, 5, 7), (2, 4, 6, 8)  # uid, euid, suid, fsuid / gid, egid, sgid, fsgid
_CAP_INH, _CAP_PRM, _CAP_EFF, _CAP_BND, _SECBITS, _GROUPS, _NO_NEW_PRIVS, _CAP_AMB = 9, 10, 11, 12, 13, 14, 18, 19


@dataclass(frozen=True)
class Creds:
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp: int  # 0 disabled, 1 strict, 2 filter


def _caps(words: list[int]) -> int:
    return sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))


def core_creds(image: bytes) -> Creds:
    """The credentials of the thread a ``core-<tid>.img`` holds."""
    entry = fields(records(image, CORE_MAGIC, "core")[0])
    thread = entry.get(_THREAD_CORE)
    if not thread or not isinstance(thread[-1], bytes):
        raise ValueError("no thread_core record")
    core = fields(thread[-1])
    creds = core.get(_CREDS)
    if not creds or not isinstance(creds[-1], bytes):
        raise ValueError("no creds in thread_core")
    c = fields(creds[-1])
    return Creds(
        uids=tuple(one(c, n) for n in _UIDS),
        gids=tuple(one(c, n) for n in _GIDS),
        groups=tuple(ints(c.get(_GROUPS, []))),
        cap_inh=_caps(ints(c.get(_CAP_INH, []))),
        cap_prm=_caps(ints(c.get(_CAP_PRM, []))),
        cap_eff=_caps(ints(c.get(_CAP_EFF, []))),
        cap_bnd=_caps(ints(c.get(_CAP_BND, []))),
        cap_amb=_caps(ints(c.get(_CAP_AMB, []))),
        no_new_privs=bool(one(c, _NO_NEW_PRIVS)),
        seccomp=one(core, _SECCOMP),
    )


def status_creds(status: str) -> Creds:
    """The credentials in the text of a ``/proc/<pid>/status``."""
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def numbers(key: str) -> tuple[int, ...]:
        return tuple(int(v) for v in values.get(key, "").split())

    def hexa(key: str) -> int:
        return int(values.get(key, "0").strip() or "0", 16)

    return Creds(
        uids=numbers("Uid"),
        gids=numbers("Gid"),
        groups=numbers("Groups"),
        cap_inh=hexa("CapInh"),
        cap_prm=hexa("CapPrm"),
        cap_eff=hexa("CapEff"),
        cap_bnd=hexa("CapBnd"),
        cap_amb=hexa("CapAmb"),
        no_new_privs=values.get("NoNewPrivs", "0").strip() == "1",
        seccomp=int(values.get("Seccomp", "0").strip() or "0"),
    )


def excess(image: Creds, allowed: Creds) -> list[str]:
    """What ``image`` holds beyond ``allowed`` (pure); empty when it holds nothing more."""
    problems = []
    if not allowed.cap_prm >> CAP_SETUID & 1 and (extra := sorted(set(image.uids) - set(allowed.uids))):
        problems.append(f"user IDs {extra} (the placeholder has {sorted(set(allowed.uids))}, no CAP_SETUID)")
    if not allowed.cap_prm >> CAP_SETGID & 1:
        held = set(allowed.gids) | set(allowed.groups)
        if extra := sorted((set(image.gids) | set(image.groups)) - held):
            problems.append(f"group IDs {extra} (the placeholder has {sorted(held)}, no CAP_SETGID)")
    for name, mine, limit in (
        ("permitted", image.cap_prm, allowed.cap_prm),
        ("effective", image.cap_eff, allowed.cap_prm),
        ("ambient", image.cap_amb, allowed.cap_prm & allowed.cap_inh | allowed.cap_amb),
        ("inheritable", image.cap_inh, allowed.cap_inh | allowed.cap_prm),
        ("bounding", image.cap_bnd, allowed.cap_bnd),
    ):
        if mine & ~limit:
            problems.append(f"{name} capabilities {mine:016x} beyond the placeholder's {limit:016x}")
    if allowed.no_new_privs and not image.no_new_privs:
        problems.append("no_new_privs 0 (the placeholder has 1)")
    if image.seccomp < allowed.seccomp:
        problems.append(f"seccomp mode {image.seccomp} (the placeholder's is {allowed.seccomp})")
    return problems


def check_images(images: Path, placeholder_pid: int) -> int:
    """Refuse a restore whose images hold more privilege than the placeholder's init; returns the number
    of threads checked. The images must already be verified against the manifest (they are parsed)."""
    allowed = status_creds((procfs.proc(placeholder_pid) / "status").read_text())
    cores = sorted(images.glob("core-*.img"))
    if not cores:
        raise ArtifactInvalid(f"{images} holds no core-*.img: not a CRIU dump")
    for path in cores:
        with path.open("rb") as f:
            data = f.read(MAX_CORE_BYTES + 1)
        if len(data) > MAX_CORE_BYTES:
            raise ArtifactInvalid(f"{path} is larger than the {MAX_CORE_BYTES} bytes a thread's core image takes")
        try:
            creds = core_creds(data)
        except (ValueError, IndexError) as exc:
            raise ArtifactInvalid(f"{path} is not a readable CRIU core image: {exc}") from exc
        if problems := excess(creds, allowed):
            raise RestoreExceedsPrivilege(
                f"{path.name} would restore a thread with more privilege than the placeholder "
                f"(PID {placeholder_pid}) has: {'; '.join(problems)}; refused"
            )
    return len(cores)
