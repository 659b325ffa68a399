"""The edge bundle: ONNX files + a manifest with checksums, optionally Ed25519-signed.

Layout::

    bundle/manifest.json      what is in the bundle (format, version, classes, groups, parts, head, base, reports)
    bundle/manifest.sig       base64 Ed25519 signature of manifest.json's exact bytes (when signed)
    bundle/parts/device-<k>.onnx, parts/device-<k>.int8.onnx
    bundle/head.onnx, base.onnx, base.int8.onnx, parity.json

Loading checks, in this order, before any ONNX Runtime session exists: the signature
(when a verify key is given: a manifest edited after signing, or an unsigned bundle,
is refused), the format version, then every listed file's size and sha256. Integrity
therefore never depends on what a file claims about itself. A session is then made from
the bytes of one more read that is checked again (``Bundle.read_verified``): the bytes
verified are the bytes run, even if a file is swapped in between.

Torch-free (numpy-free too): only the standard library and ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..shared.errors import PapmError
from ..shared.files import atomic_write_bytes

BUNDLE_FORMAT = "papm-edge-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PRIVATE_KEY = "papm-signing-key.pem"
PUBLIC_KEY = "papm-signing-key.pub.pem"


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(bundle_dir: Path | str, rel: str) -> dict[str, Any]:
    """{"file", "sha256", "bytes"} for a file inside the bundle (paths are relative, POSIX)."""
    path = Path(bundle_dir) / rel
    return {"file": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---- keys and signatures ---------------------------------------------------------------

def generate_keypair(directory: Path | str, force: bool = False) -> tuple[Path, Path]:
    """Write an Ed25519 key pair as PEM files; returns (private key path, public key path).

    The private key is PKCS#8 without a passphrase, readable by its owner only (0600):
    keep it off the edge devices; they need only the public key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    priv_path, pub_path = directory / PRIVATE_KEY, directory / PUBLIC_KEY
    if not force:
        for p in (priv_path, pub_path):
            if p.exists():
                raise PapmError(f"{p} already exists; pass --force to replace the key pair (old signatures stop verifying)")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(priv_path, priv, mode=0o600)  # owner-only before the key is written
    atomic_write_bytes(pub_path, pub)
    return priv_path, pub_path


def _load_key(path: Path | str, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    path = Path(path)
    what = "signing (private)" if private else "verify (public)"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PapmError(f"cannot read the {what} key {path} ({e.strerror}); give an Ed25519 PEM file") from None
    if not private and b"PRIVATE KEY-----" in data:  # the two files of a pair are easily swapped
        raise PapmError(f"{path} is the private (signing) key; --verify-key takes the public key, "
                        f"{PUBLIC_KEY} beside it (keep the private key off the devices)")
    if private and b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise PapmError(f"{path} is a public key; signing needs the private key of the pair ({PRIVATE_KEY})")
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise PapmError(f"{path} is not an unencrypted {what} key in PEM format ({str(e).splitlines()[0][:80]}); "
                        "make a pair with `papm export RUN --new-key DIR` (or use the kit's signing/ pair)") from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise PapmError(f"{path} holds a {type(key).__name__.lstrip('_')}, not an Ed25519 key; use an Ed25519 key pair")
    return key


def sign_manifest(bundle_dir: Path | str, private_key: Path | str) -> Path:
    """Sign manifest.json's exact bytes; writes manifest.sig (base64 text)."""
    bundle_dir = Path(bundle_dir)
    key = _load_key(private_key, private=True)
    sig = key.sign((bundle_dir / MANIFEST).read_bytes())
    return atomic_write_bytes(bundle_dir / SIGNATURE, base64.b64encode(sig) + b"\n")


def verify_signature(bundle_dir: Path | str, public_key: Path | str, manifest_bytes: bytes | None = None) -> None:
    """Check manifest.sig against ``manifest_bytes`` (the bytes the caller goes on to parse, so
    what is verified is exactly what is used) or, without them, against manifest.json on disk."""
    from cryptography.exceptions import InvalidSignature

    bundle_dir = Path(bundle_dir)
    key = _load_key(public_key, private=False)
    sig_path = bundle_dir / SIGNATURE
    if not sig_path.is_file():
        raise PapmError(f"{bundle_dir} is not signed (no {SIGNATURE}) but --verify-key was given; "
                        "re-export it with --sign-key, or drop --verify-key to check checksums only")
    try:
        sig = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except ValueError:
        raise PapmError(f"{sig_path} is not a base64 signature (damaged); re-export the bundle with --sign-key") from None
    try:
        key.verify(sig, manifest_bytes if manifest_bytes is not None else (bundle_dir / MANIFEST).read_bytes())
    except InvalidSignature:
        raise PapmError(f"{bundle_dir / MANIFEST} does not match its signature under {public_key} (edited after signing, "
                        "or signed with another key); get the original bundle or the right public key") from None


# ---- writing and loading -----------------------------------------------------------------

def write_manifest(bundle_dir: Path | str, manifest: dict[str, Any], sign_key: Path | str | None = None) -> Path:
    """Write manifest.json (format/version added here) and, with ``sign_key``, manifest.sig."""
    bundle_dir = Path(bundle_dir)
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **manifest}
    path = atomic_write_bytes(bundle_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    if sign_key is not None:
        sign_manifest(bundle_dir, sign_key)
    elif (bundle_dir / SIGNATURE).exists():
        (bundle_dir / SIGNATURE).unlink()  # a stale signature would describe another manifest
    return path


def iter_files(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every {"file", "sha256", "bytes"} entry the manifest lists, wherever it sits (an entry
    without a sha256 is yielded too, so that loading refuses it instead of trusting the file)."""
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    yield from walk(manifest)


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    signed: bool  # True only when the signature was verified

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def parts(self) -> list[dict[str, Any]]:
        return list(self.manifest["parts"])

    def file(self, entry: dict[str, Any]) -> Path:
        return self.path / entry["file"]

    def read_verified(self, entry: dict[str, Any]) -> bytes:
        """A bundle file's bytes, read once and checked against the manifest's size and sha256: the
        caller runs exactly these bytes, so a file swapped after :func:`load_bundle` is never run."""
        data = self.file(entry).read_bytes()
        if len(data) != entry.get("bytes", len(data)) or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise PapmError(f"bundle file {self.file(entry)} changed since the bundle was checked (its sha256 differs "
                            "from the manifest); copy the bundle again or re-export it")
        return data

    def precisions(self) -> list[str]:
        """Precisions every part has (the head always runs fp32)."""
        common = None
        for part in self.parts:
            have = set(part["files"])
            common = have if common is None else common & have
        return [p for p in ("fp32", "int8") if p in (common or set())]


_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        print(f"warning: {message}", file=sys.stderr)
        _warned = True


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """The first field whose type is not what the runtime reads, or None (a hand-edited manifest is one line, not a traceback)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num_list(v):
        return isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    def files_ok(node, where):
        files = node.get("files") if isinstance(node, dict) else None
        if not isinstance(files, dict) or "fp32" not in files or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                                          for e in files.values()):
            return f"{where}.files must map precisions to file entries"
        return None

    if not isinstance(m["class_names"], list) or not m["class_names"] or not all(isinstance(c, str) for c in m["class_names"]):
        return "class_names must be a list of names"
    inp = m["input"]
    if not isinstance(inp, dict) or not is_int(inp.get("channels")) or not is_int(inp.get("image_size")):
        return "input.channels and input.image_size must be integers"
    if inp["channels"] not in (1, 3) or not 8 <= inp["image_size"] <= 512:
        return f"input.channels must be 1 or 3 and input.image_size 8 to 512 (got {inp['channels']} and {inp['image_size']})"
    if not (is_num_list(inp.get("mean")) and is_num_list(inp.get("std")) and len(inp["mean"]) == len(inp["std"]) == inp["channels"]):
        return "input.mean and input.std must be one number per channel"
    if not all(math.isfinite(v) for v in inp["mean"]) or not all(math.isfinite(v) and v > 0 for v in inp["std"]):
        return f"input.mean must be finite and input.std finite and > 0 (got std {inp['std']})"
    if not isinstance(m["parts"], list) or not m["parts"]:
        return "parts must be a non-empty list"
    for i, part in enumerate(m["parts"]):
        if not isinstance(part, dict) or not is_int(part.get("feature_size")) or not isinstance(part.get("input_name"), str):
            return f"parts[{i}] needs an integer feature_size and an input_name"
        if files_ok(part, f"parts[{i}]"):
            return files_ok(part, f"parts[{i}]")
    head = m["head"]
    if not isinstance(head, dict) or not is_int(head.get("feature_size")) or not isinstance(head.get("input_name"), str):
        return "head needs an integer feature_size and an input_name"
    if files_ok(head, "head"):
        return files_ok(head, "head")
    if "base" in m and files_ok(m["base"], "base"):
        return files_ok(m["base"], "base")
    return None


def load_bundle(bundle_dir: Path | str, verify_key: Path | str | None = None, quiet: bool = False) -> Bundle:
    """Open a bundle after checking it (see the module docstring); no ONNX session is created here."""
    bundle_dir = Path(bundle_dir)
    mpath = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise PapmError(f"bundle folder not found: {bundle_dir}; create it with `papm export RUN_DIR`")
    if not mpath.is_file():
        raise PapmError(f"{bundle_dir} is not an edge bundle (no {MANIFEST}); create one with `papm export RUN_DIR`")
    raw = mpath.read_bytes()  # read once: the bytes verified are the bytes parsed
    if verify_key is not None:
        verify_signature(bundle_dir, verify_key, raw)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PapmError(f"{mpath} is not valid JSON ({str(e).splitlines()[0][:80]}); the bundle is damaged, re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise PapmError(f"{mpath} is not a PAPM bundle manifest (format {BUNDLE_FORMAT!r}); re-export with `papm export`")
    if manifest.get("version") != BUNDLE_VERSION:
        raise PapmError(f"{mpath} has bundle version {manifest.get('version')!r}, this papm reads version {BUNDLE_VERSION}; "
                        "re-export the bundle with this papm, or use the papm that wrote it")
    for key in ("class_names", "parts", "head", "input"):
        if key not in manifest:
            raise PapmError(f"{mpath} lacks {key!r}; the bundle is damaged, re-export it")
    problem = _manifest_problem(manifest)
    if problem:
        raise PapmError(f"{mpath}: {problem}; the manifest is damaged or hand-made, re-export the bundle")
    root = bundle_dir.resolve()
    for entry in iter_files(manifest):
        if not isinstance(entry.get("sha256"), str):
            raise PapmError(f"{mpath} lists {entry['file']!r} without a sha256; the manifest is damaged or hand-made, "
                            "re-export the bundle")
        path = (bundle_dir / entry["file"])
        if root not in path.resolve().parents:  # a manifest must not point outside its bundle
            raise PapmError(f"{mpath} lists {entry['file']!r} outside the bundle; the manifest is damaged, re-export it")
        if not path.is_file():
            raise PapmError(f"bundle file missing: {path}; copy the whole bundle folder again or re-export it")
        if path.stat().st_size != entry.get("bytes", path.stat().st_size) or sha256_file(path) != entry["sha256"]:
            raise PapmError(f"bundle file {path} does not match its sha256 in the manifest (tampered or damaged); "
                            "copy the bundle again or re-export it")
    bundle = Bundle(bundle_dir, manifest, signed=verify_key is not None)
    if not quiet:
        warn_if_unsigned(bundle)
    return bundle


def warn_if_unsigned(bundle: Bundle) -> None:
    """The note for a bundle used without --verify-key (the edge commands print it after their work, so that an
    error stays the only line of a failed command)."""
    if not bundle.signed:
        _warn_once(f"no --verify-key given: {bundle.path} checked against its manifest checksums only, not its signature")


def check_signing_key(path: Path | str) -> None:
    """An unreadable, encrypted or non-Ed25519 signing key is one line at the start of a run, not after it."""
    _load_key(path, private=True)


def check_run_signing_key(sign_key: str) -> None:
    """The run config's ``sign-key``: nothing when empty, else a readable Ed25519 private key or one error line."""
    if not sign_key:
        return
    key = Path(sign_key).expanduser()
    if not key.is_file():
        raise PapmError(f"sign-key {sign_key} not found on the server; give the path of an Ed25519 private key "
                        "(papm deploy init writes one to KIT/signing/) or leave sign-key empty")
    check_signing_key(key)
