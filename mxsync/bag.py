"""BagIt bags (RFC 8493) around an EPN's data/ folder: hash the payload, write the tag files, verify a bag.

Paths are bytes throughout (file names need not be UTF-8). Nothing here follows a symbolic link or deletes a file
at the destination: files replaced by a rewrite are renamed to `<name>.set-aside`.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import secrets
import stat

from mxsync.errors import BagError, TransferStopped

logger = logging.getLogger("mxsync.bag")

LOCAL_ALGORITHM = "sha256"
ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
# verify_bag checks the strongest payload manifest present.
STRENGTH = ("sha512", "sha256", "sha1", "md5")
DIGEST_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}

CHUNK_SIZE = 1 << 20
BAGIT_TXT = b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
SET_ASIDE_SUFFIX = ".set-aside"
NEW_FILE_MODE = 0o664  # before the umask, like the payload files rsync writes with --chmod=ug+w,o-wx

# O_NONBLOCK: a regular file swapped for a FIFO between lstat and open must not block the open.
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ANY_MANIFEST = re.compile(r"\A(?:tag)?manifest-[A-Za-z0-9_]+\.txt\Z")
_PERCENT_DECODE = re.compile(rb"%(25|0[Aa]|0[Dd])")
_DECODED = {b"25": b"%", b"0A": b"\n", b"0D": b"\r"}
_MANIFEST_LINE = re.compile(rb"\A([0-9A-Fa-f]+)[ \t]+(.+)\Z", re.DOTALL)
# Control characters and every other line break that Python's str.splitlines knows (bagit reads tag files with it).
_UNSAFE_IN_VALUE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# Characters that bagit (codecs readline, then str.splitlines) takes for the end of a line.
_BAGIT_LINE_BREAKS = frozenset("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def file_stamp(st):
    """What tells that a file may have changed since it was hashed: (st_mtime_ns, st_ctime_ns, st_ino)."""
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _check_algorithm(algorithm):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported bag algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")


def _hash_descriptor(fd, algorithm, stop, progress):
    """Hash an open file to its end in CHUNK_SIZE reads; return (hex digest, bytes read)."""
    digest = hashlib.new(algorithm)
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    total = 0
    while True:
        if stop is not None and stop.is_set():
            raise TransferStopped("hashing stopped: mxsync is stopping")
        count = os.readv(fd, [buffer])
        if not count:
            return digest.hexdigest(), total
        digest.update(view[:count])  # hashlib releases the GIL for large updates: hashing runs beside transfers
        total += count
        if progress is not None:
            progress(count)


def _hash_path(path, algorithm, stop, progress):
    """Open a regular file without following a link and hash it: (hex digest, bytes read); OSError as is."""
    fd = os.open(path, _OPEN_READ)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        os.set_blocking(fd, True)
        return _hash_descriptor(fd, algorithm, stop, progress)
    finally:
        os.close(fd)


def hash_file(path, algorithm, stop=None, progress=None):
    """Hex digest of a regular file (never through a symbolic link); BagError if it cannot be read."""
    _check_algorithm(algorithm)
    try:
        return _hash_path(path, algorithm, stop, progress)[0]
    except OSError as error:
        raise BagError(f"{os.fsdecode(path)}: cannot be hashed: {_reason(error)}") from error


def _reason(error):
    return error.strerror or str(error)


# ---------------------------------------------------------------- the payload


def _walk_payload(data_dir, skipped):
    """Yield (relative path bytes, lstat result) of every regular file under data_dir, links not followed.

    Iterative (no recursion limit). Symbolic links and special files are not payload: their relative paths go
    to `skipped`. OSError propagates.
    """
    pending = [b""]
    while pending:
        relative_dir = pending.pop()
        with os.scandir(os.path.join(data_dir, relative_dir) if relative_dir else data_dir) as entries:
            for entry in entries:
                relative = os.path.join(relative_dir, entry.name) if relative_dir else entry.name
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    pending.append(relative)
                elif stat.S_ISREG(info.st_mode):
                    yield relative, info
                else:
                    kind = "symbolic link" if stat.S_ISLNK(info.st_mode) else "special file"
                    logger.debug("%s: a %s, not in the bag's payload", display_path(relative), kind)
                    skipped.append(relative)


def _payload_dir(bag_dir):
    """bag_dir/data as bytes; BagError unless it is a real folder (a link to one is not followed)."""
    data_dir = os.path.join(os.fsencode(bag_dir), b"data")
    try:
        mode = os.lstat(data_dir).st_mode
    except OSError as error:
        raise BagError(f"{os.fsdecode(data_dir)}: {_reason(error)}") from error
    if not stat.S_ISDIR(mode):
        raise BagError(f"{os.fsdecode(data_dir)}: not a folder (a bag's payload must be one, links are not followed)")
    return data_dir


def payload_entries(bag_dir, algorithm, known=None, stop=None, progress=None, skipped=None):
    """Digest every regular file under bag_dir/data: (sorted [(relative path bytes, size, hex)], hashed files, bytes).

    `known` maps relative path bytes to (size, file_stamp, hex) of an earlier hash; it is reused only when the
    file's size and stamp are both unchanged. Links and special files are left out; pass a list as `skipped` to
    receive their relative paths. BagError names a file or folder that cannot be read.
    """
    _check_algorithm(algorithm)
    known = known or {}
    skipped = [] if skipped is None else skipped
    data_dir = _payload_dir(bag_dir)
    entries = []
    hashed_files = hashed_bytes = 0
    walk = _walk_payload(data_dir, skipped)
    while True:
        try:
            item = next(walk, None)
        except OSError as error:
            raise BagError(f"{os.fsdecode(error.filename or data_dir)}: cannot be listed: {_reason(error)}") from error
        if item is None:
            break
        relative, info = item
        earlier = known.get(relative)
        if earlier is not None and earlier[0] == info.st_size and tuple(earlier[1]) == file_stamp(info):
            entries.append((relative, info.st_size, earlier[2]))
            continue
        path = os.path.join(data_dir, relative)
        try:
            digest, size = _hash_path(path, algorithm, stop, progress)
        except OSError as error:
            raise BagError(f"{os.fsdecode(path)}: cannot be hashed: {_reason(error)}") from error
        # The size read, not the size listed: the digest and Payload-Oxum then describe the same bytes.
        entries.append((relative, size, digest))
        hashed_files += 1
        hashed_bytes += size
    entries.sort()
    return entries, hashed_files, hashed_bytes


# ---------------------------------------------------------------- paths in manifests


def encode_path(path):
    """Percent-encode a path for a manifest line (RFC 8493 section 2.1.3): % as %25, CR as %0D, LF as %0A."""
    return path.replace(b"%", b"%25").replace(b"\r", b"%0D").replace(b"\n", b"%0A")


def decode_path(encoded):
    """The inverse of encode_path, in one pass (so %250A is %0A, not LF); other %XX are left as they are."""
    return _PERCENT_DECODE.sub(lambda match: _DECODED[match.group(1).upper()], encoded)


def display_path(relative):
    """data/<path> on one line for people: encoded as in a manifest, bytes that are not UTF-8 as \\xNN."""
    return "data/" + encode_path(relative).decode("utf-8", "backslashreplace")


def bagit_cannot_read(relative):
    """True for a payload path (relative to data/, bytes) that the `bagit` package does not read back from our manifest.

    Found by experiment with bagit 1.9 (tests/unit/test_bag.py): it decodes neither %25 nor more than two %0D or
    %0A, strips whitespace at the end of a line, splits lines at every str.splitlines break, and decodes the
    manifest as strict UTF-8 (one such name makes it reject the whole manifest).
    """
    try:
        text = relative.decode("utf-8")
    except UnicodeDecodeError:
        return True
    if "%" in text or text.count("\r") > 2 or text.count("\n") > 2:
        return True
    if any(character in _BAGIT_LINE_BREAKS for character in text):
        return True
    return text[-1:].isspace() and text[-1:] not in ("\r", "\n")


def _manifest_line(digest, path):
    return digest.encode("ascii") + b"  " + encode_path(path) + b"\n"


def parse_manifest(content, name, payload):
    """Read a manifest's bytes: ({path bytes relative to the bag: lowercase hex}, [problems]).

    `payload`: a payload manifest, whose paths must be under data/. Problems name the manifest and the line.
    """
    algorithm = name.split("-", 1)[1].rsplit(".", 1)[0]
    length = DIGEST_LENGTHS.get(algorithm)
    digests = {}
    problems = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line)
        if match is None or (length is not None and len(match.group(1)) != length):
            problems.append(f"{name} line {number}: not '<{algorithm} digest> <path>'")
            continue
        path = decode_path(match.group(2))
        parts = path.split(b"/")
        if (
            path.startswith(b"/")
            or any(part in (b"", b".", b"..") for part in parts)
            or (payload and (len(parts) < 2 or parts[0] != b"data"))
        ):
            where = "outside data/" if payload else "unsafe"
            problems.append(f"{name} line {number}: path {_show(path)} is {where}")
            continue
        if path in digests:
            problems.append(f"{name} line {number}: {_show(path)} listed twice")
            continue
        digests[path] = match.group(1).decode("ascii").lower()
    return digests, problems


def _show(path):
    return encode_path(path).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- writing a bag


def _sanitise_value(value):
    """A bag-info value on one line: control characters and line breaks become a space, ends stripped (as bagit reads)."""
    return _UNSAFE_IN_VALUE.sub(" ", str(value)).strip()


def _check_label(label):
    if not label or label != label.strip() or ":" in label or _UNSAFE_IN_VALUE.search(label):
        raise ValueError(f"unusable bag-info label {label!r}")


def bag_info_text(info, entries):
    """bag-info.txt's bytes: the (label, value or values) pairs in order, then Bagging-Date and Payload-Oxum if absent.

    A value of None is left out (an unknown visit end is no line, not "None").
    """
    lines = []
    labels = set()
    for label, values in info:
        _check_label(label)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None:
                labels.add(label.lower())
                lines.append(f"{label}: {_sanitise_value(value)}")
    if "bagging-date" not in labels:
        lines.append(f"Bagging-Date: {datetime.date.today().isoformat()}")
    if "payload-oxum" not in labels:
        lines.append(f"Payload-Oxum: {sum(entry[1] for entry in entries)}.{len(entries)}")
    # backslashreplace: a value decoded from a non-UTF-8 name (surrogate escapes) still writes, visibly.
    return "".join(line + "\n" for line in lines).encode("utf-8", "backslashreplace")


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(bag_dir, name, content, mode):
    """Write bag_dir/name atomically: a new temporary file beside it, fsync, rename over. OSError as is."""
    final = os.path.join(bag_dir, name)
    temporary = os.path.join(bag_dir, b".%s.%s.mxsync-tmp" % (name, secrets.token_hex(6).encode()))
    fd = os.open(temporary, _OPEN_NEW, NEW_FILE_MODE)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, final)
    except BaseException:
        try:
            os.unlink(temporary)  # our own temporary file, never anything that was there before
        except OSError:
            pass
        raise


def _set_aside(bag_dir, name):
    """Rename bag_dir/name to name.set-aside (or .set-aside.N when that is taken); return the new name."""
    target = name + SET_ASIDE_SUFFIX.encode()
    number = 1
    while os.path.lexists(os.path.join(bag_dir, target)):
        number += 1
        target = b"%s%s.%d" % (name, SET_ASIDE_SUFFIX.encode(), number)
    os.rename(os.path.join(bag_dir, name), os.path.join(bag_dir, target))
    logger.info("%s: set aside as %s (a manifest of another algorithm)", os.fsdecode(name), os.fsdecode(target))
    return target


def write_bag(bag_dir, entries, info, algorithm, mode=None):
    """Make bag_dir a bag of `entries` (from payload_entries): manifest, bag-info.txt, tag manifest, then bagit.txt.

    bagit.txt goes first and comes back last, so a bag cut off half-way is never taken for a complete one.
    Manifests of other algorithms are set aside (renamed), never deleted. Files get 0o664 less the umask, or
    exactly `mode` when given. BagError names the file that could not be written.
    """
    _check_algorithm(algorithm)
    bag_dir = os.fsencode(bag_dir)
    manifest_name = f"manifest-{algorithm}.txt".encode()
    tagmanifest_name = f"tagmanifest-{algorithm}.txt".encode()
    manifest = b"".join(_manifest_line(digest, b"data/" + path) for path, _size, digest in sorted(entries))
    bag_info = bag_info_text(info, entries)
    tag_files = ((b"bagit.txt", BAGIT_TXT), (b"bag-info.txt", bag_info), (manifest_name, manifest))
    tagmanifest = b"".join(_manifest_line(hashlib.new(algorithm, data).hexdigest(), name) for name, data in tag_files)

    current = os.path.join(bag_dir, b"bagit.txt")
    try:
        try:
            os.unlink(current)
        except FileNotFoundError:
            pass
        _fsync_folder(bag_dir)  # the removal is on disk before anything it guards changes
        for name in sorted(os.listdir(bag_dir)):
            if name not in (manifest_name, tagmanifest_name) and _ANY_MANIFEST.match(os.fsdecode(name)):
                current = os.path.join(bag_dir, name)
                _set_aside(bag_dir, name)
        for name, content in ((manifest_name, manifest), (b"bag-info.txt", bag_info), (tagmanifest_name, tagmanifest)):
            current = os.path.join(bag_dir, name)
            _write_file(bag_dir, name, content, mode)
        current = os.path.join(bag_dir, b"bagit.txt")
        _write_file(bag_dir, b"bagit.txt", BAGIT_TXT, mode)
        _fsync_folder(bag_dir)
    except OSError as error:
        raise BagError(f"{os.fsdecode(current)}: cannot write the bag: {_reason(error)}") from error
    logger.debug("%s: bagged %d files with %s", os.fsdecode(bag_dir), len(entries), algorithm)


# ---------------------------------------------------------------- verifying a bag


def _read_tag_file(bag_dir, name):
    """The bytes of a tag file at the top of the bag, never through a link; OSError as is."""
    fd = os.open(os.path.join(bag_dir, name), _OPEN_READ)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        os.set_blocking(fd, True)
        chunks = []
        while True:
            chunk = os.read(fd, CHUNK_SIZE)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def parse_tags(content):
    """[(label, value)] of a tag file (bagit.txt, bag-info.txt), folded lines joined; ValueError if malformed."""
    tags = []
    for line in content.decode("utf-8", "surrogateescape").splitlines():
        if not line.strip():
            continue
        if line[0] in " \t" and tags:
            tags[-1] = (tags[-1][0], f"{tags[-1][1]} {line.strip()}".strip())
            continue
        label, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"line {line!r} has no ':'")
        tags.append((label.strip(), value.strip()))
    return tags


def _tag(tags, label):
    return next((value for name, value in tags if name.lower() == label.lower()), None)


def _is_regular(path):
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _tag_path_is_plain(bag_dir, path):
    """No folder on the way to a tag file listed in a tag manifest is a link (open's O_NOFOLLOW sees only the last)."""
    parts = path.split(b"/")[:-1]
    for depth in range(1, len(parts) + 1):
        try:
            if not stat.S_ISDIR(os.lstat(os.path.join(bag_dir, *parts[:depth])).st_mode):
                return False
        except OSError:
            return False
    return True


def _verify_tag_manifests(bag_dir, stop, progress):
    problems = []
    for algorithm in ALGORITHMS:
        name = f"tagmanifest-{algorithm}.txt"
        if not _is_regular(os.path.join(bag_dir, name.encode())):
            continue
        try:
            digests, found = parse_manifest(_read_tag_file(bag_dir, name.encode()), name, payload=False)
        except OSError as error:
            problems.append(f"{name}: unreadable: {_reason(error)}")
            continue
        problems.extend(found)
        for path, expected in sorted(digests.items()):
            target = os.path.join(bag_dir, path)
            if not _tag_path_is_plain(bag_dir, path) or not os.path.lexists(target):
                problems.append(f"{name}: {_show(path)}: missing")
                continue
            try:
                actual = _hash_path(target, algorithm, stop, progress)[0]
            except OSError as error:
                problems.append(f"{name}: {_show(path)}: unreadable: {_reason(error)}")
                continue
            if actual != expected:
                problems.append(f"{name}: {_show(path)}: changed ({algorithm} {expected} != {actual})")
    return problems


def _check_oxum(tags, files):
    oxum = _tag(tags, "Payload-Oxum")
    if oxum is None:
        return []
    match = re.fullmatch(r"(\d+)\.(\d+)", oxum)
    if match is None:
        return [f"bag-info.txt: malformed Payload-Oxum {oxum!r}"]
    found = f"{sum(info.st_size for info in files.values())}.{len(files)}"
    if found != f"{int(match.group(1))}.{int(match.group(2))}":
        return [f"Payload-Oxum mismatch: bag-info.txt says {oxum} (bytes.files), data/ holds {found}"]
    return []


def verify_bag(bag_dir, fast=False, stop=None, progress=None):
    """Every problem of the bag at bag_dir, as lines for people; [] when it is valid. Links are never followed.

    Checks bagit.txt, the tag manifests, Payload-Oxum, and the strongest payload manifest: every file missing,
    changed or not in it. `fast`: sizes and counts only (Payload-Oxum, files missing or extra), no hashing.
    """
    bag_dir = os.fsencode(bag_dir)
    if not os.path.lexists(os.path.join(bag_dir, b"bagit.txt")):
        return ["not a bag: no bagit.txt"]
    problems = []
    try:
        declaration = parse_tags(_read_tag_file(bag_dir, b"bagit.txt"))
    except (OSError, ValueError) as error:
        return [f"bagit.txt: unreadable: {_reason(error) if isinstance(error, OSError) else error}"]
    version = _tag(declaration, "BagIt-Version")
    if version is None or not re.fullmatch(r"\d+\.\d+", version):
        problems.append(f"bagit.txt: BagIt-Version is {version!r}, not MAJOR.MINOR")
    encoding = _tag(declaration, "Tag-File-Character-Encoding")
    if encoding is None or encoding.lower().replace("-", "") != "utf8":
        return problems + [f"bagit.txt: Tag-File-Character-Encoding is {encoding!r}; only UTF-8 is read"]

    tags = []
    if os.path.lexists(os.path.join(bag_dir, b"bag-info.txt")):
        try:
            tags = parse_tags(_read_tag_file(bag_dir, b"bag-info.txt"))
        except (OSError, ValueError) as error:
            problems.append(f"bag-info.txt: unreadable: {_reason(error) if isinstance(error, OSError) else error}")

    algorithm = next(
        (name for name in STRENGTH if _is_regular(os.path.join(bag_dir, f"manifest-{name}.txt".encode()))), None
    )
    if algorithm is None:
        problems.append(f"no payload manifest (manifest-<{'|'.join(STRENGTH)}>.txt)")
        digests = None
    else:
        name = f"manifest-{algorithm}.txt"
        try:
            digests, found = parse_manifest(_read_tag_file(bag_dir, name.encode()), name, payload=True)
            problems.extend(found)
        except OSError as error:
            problems.append(f"{name}: unreadable: {_reason(error)}")
            digests = None
    if not fast:
        problems.extend(_verify_tag_manifests(bag_dir, stop, progress))

    try:
        data_dir = _payload_dir(bag_dir)
    except BagError as error:
        return problems + [f"data/: {error}"]
    skipped = []
    try:
        files = {b"data/" + relative: info for relative, info in _walk_payload(data_dir, skipped)}
    except OSError as error:
        return problems + [f"{os.fsdecode(error.filename or data_dir)}: cannot be listed: {_reason(error)}"]
    problems.extend(_check_oxum(tags, files))
    if digests is None:
        return problems
    links = {b"data/" + relative for relative in skipped}
    for path in sorted(set(digests) | set(files)):
        if path not in files:
            kind = "not a regular file, not followed" if path in links else "missing"
            problems.append(f"{_show(path)}: {kind}")
        elif path not in digests:
            problems.append(f"{_show(path)}: not in the manifest")
        elif not fast:
            try:
                actual = _hash_path(os.path.join(bag_dir, path), algorithm, stop, progress)[0]
            except OSError as error:
                problems.append(f"{_show(path)}: unreadable: {_reason(error)}")
                continue
            if actual != digests[path]:
                problems.append(f"{_show(path)}: changed ({algorithm} {digests[path]} != {actual})")
    return problems
