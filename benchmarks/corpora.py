"""Text domains for routing benchmarks: 17 sources the demo never used, all already on a Debian machine.

Every domain is read at run time from files that Debian packages install (man pages, changelogs, glibc's locale
definitions, Perl's library, CMake's modules, Vim's runtime, C and C++ headers, GNU info manuals, ...); nothing is
downloaded and nothing is shipped with peft-xlora. The demo's three domains (Shakespeare, the codec tables, Python's
reference docs) and the standard library's Python source are deliberately absent, so a recipe tuned on the demo meets
text it was not tuned on.

Each domain's documents are files (or, for one-file sources, sections of a file). Train and held-out documents never
share a source document: a document is held out when the CRC-32 of its name is 0 modulo 5 (one in five), the same
rule as the demo (`peft_xlora.cli.demo.data`), so the split is the same on every machine that has the same files.
Large sources are capped at `max_docs` documents, taken in CRC-32 order of their names (a stable, unbiased subset).

Licences: the texts stay under their own licences, which each package documents in
`/usr/share/doc/<package>/copyright` (the `LICENCES` table names the packages and their main licence). The benchmark
only reads them to train and score LoRA experts kept in a local cache; no text or model trained on it is
distributed. Needs: a Debian (12 or 13) machine with the packages named in `PACKAGES` (`apt-get install -y
${PACKAGES}`, all already installed on this project's machine image).

Used by `benchmarks/routing/` (issue 25, a subset of at least six domains) and meant for issue 26 (X-LoRA over a
library of >= 16 LoRAs).
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from peft_xlora.cli.demo.data import DataError, Split, _squeeze

HELD_OUT_EVERY = 5


@dataclass(frozen=True)
class Domain:
    """One text domain.

    Attributes:
        name: Short name (also the expert's name).
        source: Where the text comes from, in words; part of the cache key of the domain's expert.
        package: The Debian package(s) that install the files.
        licence: The main licence of those files (each package's `copyright` file has the details).
        read: Returns (document name, text) pairs, at most `max_docs`, each cut to `max_chars` characters.
    """

    name: str
    source: str
    package: str
    licence: str
    read: Callable[[int, int], list[tuple[str, str]]]


def held_out(name: str, every: int = HELD_OUT_EVERY) -> bool:
    """Whether document `name` is held out (CRC-32 of the name is 0 modulo `every`)."""
    return zlib.crc32(name.encode()) % every == 0


def split(named_docs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts), in the order given."""
    named_docs = list(named_docs)
    return [t for n, t in named_docs if not held_out(n)], [t for n, t in named_docs if held_out(n)]


def _stable_subset(paths: Iterable[Path], root: Path, max_docs: int) -> list[Path]:
    """At most `max_docs` paths, in CRC-32 order of their path below `root` (independent of file-system order)."""
    ranked = sorted(paths, key=lambda p: (zlib.crc32(str(p.relative_to(root)).encode()), str(p)))
    return ranked[:max_docs]


def _read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _files(root: str, patterns: tuple[str, ...], exclude: str | None = None, min_chars: int = 400):
    """A reader of the files under `root` that match `patterns` (recursive globs), one document per file."""

    def read(max_docs: int, max_chars: int) -> list[tuple[str, str]]:
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"{root} is missing: install the Debian package(s) this domain reads (see corpora.py).")
        paths = {p for pattern in patterns for p in base.glob(pattern) if p.is_file()}
        if exclude:
            paths = {p for p in paths if not re.search(exclude, str(p.relative_to(base)))}
        docs = []
        # Read more than `max_docs` candidates: some are too short or unreadable.
        for path in _stable_subset(paths, base, 2 * max_docs):
            try:
                text = _squeeze(_read_text(path))
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            if len(text) >= min_chars:
                docs.append((str(path.relative_to(base)), text[:max_chars]))
            if len(docs) == max_docs:
                break
        return docs

    return read


def _sections(path: str, separator: str, name_of: Callable[[str], str], min_chars: int = 400):
    """A reader of one or more large files cut into sections at `separator` (a regex), one document per section."""

    def read(max_docs: int, max_chars: int) -> list[tuple[str, str]]:
        files = sorted(Path(path).parent.glob(Path(path).name))
        if not files:
            raise DataError(f"{path} is missing: install the Debian package this domain reads (see corpora.py).")
        named = {}
        for file in files:
            for i, part in enumerate(re.split(separator, _read_text(file))):
                part = _squeeze(part).strip()
                if len(part) >= min_chars:
                    named[f"{file.name}:{name_of(part) or i}"] = part[:max_chars]
        ranked = sorted(named, key=lambda n: (zlib.crc32(n.encode()), n))[:max_docs]
        return [(n, named[n]) for n in ranked]

    return read


def _first_line(text: str) -> str:
    return text.splitlines()[0][:80] if text else ""


_MIME_NAME = re.compile(r'type="([^"]+)"')


def _mime_name(text: str) -> str:
    match = _MIME_NAME.search(text)
    return match.group(1) if match else ""


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in [
        Domain(
            "man",
            "roff source of English man pages, /usr/share/man/man{1,5,8}/*.gz",
            "man-db, coreutils, dpkg, ... (every package with man pages)",
            "each package's own (mostly GPL-2+/GPL-3+)",
            # The Google Cloud SDK's thousands of generated `gcloud` pages are not a Debian package's: left out.
            _files("/usr/share/man", ("man1/*.gz", "man5/*.gz", "man8/*.gz"), exclude=r"gcloud"),
        ),
        Domain(
            "man-de",
            "roff source of German man pages, /usr/share/man/de/man*/*.gz",
            "man-db, dpkg, procps, ... (translations shipped with the packages)",
            "each package's own (mostly GPL-2+)",
            _files("/usr/share/man/de", ("man*/*.gz",)),
        ),
        Domain(
            "man-fr",
            "roff source of French man pages, /usr/share/man/fr/man*/*.gz",
            "man-db, dpkg, procps, ... (translations shipped with the packages)",
            "each package's own (mostly GPL-2+)",
            _files("/usr/share/man/fr", ("man*/*.gz",)),
        ),
        Domain(
            "changelog",
            "Debian changelogs, /usr/share/doc/*/changelog.Debian.gz",
            "every installed package",
            "each package's own",
            _files("/usr/share/doc", ("*/changelog.Debian.gz",)),
        ),
        Domain(
            "copyright",
            "Debian copyright files (machine-readable DEP-5 and free-form), /usr/share/doc/*/copyright",
            "every installed package",
            "each package's own (the files state licences)",
            _files("/usr/share/doc", ("*/copyright",)),
        ),
        Domain(
            "licences",
            "full licence texts, /usr/share/common-licenses/*",
            "base-files",
            "verbatim copying permitted by each licence text",
            _files("/usr/share/common-licenses", ("*",)),
        ),
        Domain(
            "perl",
            "Perl's core library modules (code and POD), /usr/share/perl/5.*/**/*.pm",
            "perl-modules-5.36",
            "GPL-1+ or Artistic",
            _files("/usr/share/perl", ("5.*.*/**/*.pm",)),
        ),
        Domain(
            "c-headers",
            "C headers of glibc, Linux and -dev packages, /usr/include/**/*.h (without c++/, python*/, node/)",
            "libc6-dev, linux-libc-dev, ...",
            "LGPL-2.1+ (glibc), GPL-2 with syscall note (Linux)",
            _files("/usr/include", ("**/*.h",), exclude=r"^(c\+\+|python|node)"),
        ),
        Domain(
            "cpp-headers",
            "libstdc++ headers, /usr/include/c++/*/**",
            "libstdc++-12-dev",
            "GPL-3+ with the GCC runtime library exception",
            _files("/usr/include/c++", ("*/**/*",)),
        ),
        Domain(
            "locales",
            "glibc locale definitions (LC_TIME, LC_MONETARY, ... with <Uxxxx> code points), /usr/share/i18n/locales/*",
            "locales",
            "public domain / LGPL-2.1+ (glibc locale data)",
            _files("/usr/share/i18n/locales", ("*",)),
        ),
        Domain(
            "vim-script",
            "Vim script of Vim's runtime (syntax, indent, ftplugin, autoload), /usr/share/vim/vim*/**/*.vim",
            "vim-runtime",
            "Vim licence (GPL-compatible charityware)",
            _files("/usr/share/vim", ("vim*/**/*.vim",)),
        ),
        Domain(
            "vim-help",
            "Vim's help files (its own tagged plain-text format), /usr/share/vim/vim*/doc/*.txt",
            "vim-runtime",
            "Vim licence (GPL-compatible charityware)",
            _files("/usr/share/vim", ("vim*/doc/*.txt",)),
        ),
        Domain(
            "cmake",
            "CMake's modules, /usr/share/cmake-*/Modules/**/*.cmake",
            "cmake-data",
            "BSD-3-Clause",
            _files("/usr/share", ("cmake-*/Modules/**/*.cmake",)),
        ),
        Domain(
            "texinfo",
            "GNU info manuals cut into nodes, /usr/share/info/*.info*.gz",
            "coreutils, grep, sed, gzip, wget, gnupg, ... (their info manuals)",
            "GFDL-1.3+ (most GNU manuals)",
            _sections("/usr/share/info/*.info*.gz", "\x1f", _first_line),
        ),
        Domain(
            "x11-compose",
            "X11 compose tables (key sequences -> characters), /usr/share/X11/locale/*/Compose",
            "libx11-data",
            "MIT/X11",
            _files("/usr/share/X11/locale", ("*/Compose",), min_chars=200),
        ),
        Domain(
            "mime-xml",
            "the freedesktop.org MIME database (XML with comments in many languages), cut per <mime-type>",
            "shared-mime-info",
            "GPL-2+",
            _sections("/usr/share/mime/packages/freedesktop.org.xml", r"(?=<mime-type )", _mime_name, min_chars=300),
        ),
        Domain(
            "bash-completion",
            "bash completion functions, /usr/share/bash-completion/completions/*",
            "bash-completion and the packages that ship completions",
            "GPL-2+",
            _files("/usr/share/bash-completion/completions", ("*",)),
        ),
    ]
}

PACKAGES = (
    "man-db manpages locales perl-modules-5.36 libc6-dev linux-libc-dev libstdc++-12-dev vim-runtime cmake-data "
    "libx11-data shared-mime-info bash-completion base-files coreutils grep sed"
)

# The benchmark's default subset (issue 25): two languages of one markup (man, man-de), two kinds of code (perl,
# cmake), prose with structure (changelog) and a table format (locales).
ROUTING_SUBSET = ("man", "man-de", "changelog", "perl", "cmake", "locales")


def read_domains(names: Iterable[str], max_chars: int = 20_000, max_docs: int = 300) -> Split:
    """The named domains, each split into (train, held-out) documents.

    Raises:
        DataError: A name is unknown, a source is missing, or a domain has no held-out document.
    """
    out = {}
    for name in names:
        if name not in DOMAINS:
            raise DataError(f"Unknown domain {name!r}; the corpus has {', '.join(DOMAINS)}.")
        docs = DOMAINS[name].read(max_docs, max_chars)
        train, held = split(docs)
        if not train or not held:
            raise DataError(f"Domain {name!r}: {len(train)} train and {len(held)} held-out documents; need both.")
        out[name] = (train, held)
    return out
