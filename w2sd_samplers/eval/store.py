"""The ``--out`` folder: ``settings.json`` (with the settings hash), one JSONL shard per process, images.

A row is one ``write`` of its JSON and newline, flushed to disk as soon as its image is scored. Only lines that end
with a newline count: a kill can leave the last line of a shard without its newline (whatever byte it lands on), and
that line is dropped before the shard is appended to, so a row is either whole or redone, never counted and then
lost. Lines that are not rows (garbage, NUL bytes, JSON of another shape) are skipped and reported. Rows are keyed by
(prompt index, seed, method): whichever process wrote a row, a restarted run of any size skips it.

The settings hash covers what changes a row, not which items are run: a later run may add seeds or append prompts
(the prompts stored in ``settings.json`` must stay a prefix of ``--prompts``).
"""
import dataclasses
import hashlib
import json
import os
import pathlib

from ..errors import UsageError

ROW_FIELDS = {'prompt_index': int, 'seed': int, 'method': str}


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def key(row):
    return row['prompt_index'], row['seed'], row['method']


def flag(setting):
    """The command-line flag of a settings key (``'ag_w'`` -> ``'--ag-w'``)."""
    return 'MODEL' if setting == 'model' else '--' + setting.replace('_', '-')


def _changed(stored, settings):
    """'--strength 0.5 (the run in --out has 1.0)' for every setting that differs."""
    names = sorted(set(stored) | set(settings))
    return '; '.join(f'{flag(k)} {settings.get(k)!r} (the run in --out has {stored.get(k)!r})' for k in names
                     if stored.get(k) != settings.get(k))


def _row(line):
    """The row of one newline-terminated shard line, or None when it is not a row."""
    try:
        row = json.loads(line.decode('utf-8'))
    except ValueError:                                    # also UnicodeDecodeError
        return None
    if not isinstance(row, dict) or any(type(row.get(k)) is not t for k, t in ROW_FIELDS.items()):
        return None
    return row


@dataclasses.dataclass
class Shards:
    """What the shards hold: ``rows`` (one per key, the first written, sorted by key) and ``skipped`` lines that
    are not rows, as ``(shard name, line number)``."""
    rows: list
    skipped: list

    def report(self):
        """One line about the skipped lines, or '' when there are none."""
        if not self.skipped:
            return ''
        where = ', '.join(f'{name} line {n}' for name, n in self.skipped[:5])
        more = f' and {len(self.skipped) - 5} more' if len(self.skipped) > 5 else ''
        return f'skipped {len(self.skipped)} line(s) that are not rows ({where}{more})'


class Store:
    def __init__(self, out):
        self.out = pathlib.Path(out)
        self.images = self.out / 'images'
        self.settings_path = self.out / 'settings.json'

    def stored(self):
        """The contents of settings.json, or None for a new or empty --out."""
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f'--out {self.out}: is a file; give a folder')
        if not self.out.exists() or not any(self.out.iterdir()):
            return None
        if not self.settings_path.is_file():
            raise UsageError(f'--out {self.out}: the folder is not empty and holds no eval run (settings.json); '
                             'give a new or empty folder')
        try:
            stored = json.loads(self.settings_path.read_text(encoding='utf-8'))
            stored['hash'], stored['settings'], stored['prompts']
        except (ValueError, KeyError, TypeError):
            raise UsageError(f'--out {self.out}: settings.json is unreadable; give a new folder') from None
        return stored

    def check(self, settings, prompts, resume):
        """Refuse an --out holding another run, or this run without --resume; returns the stored settings.json
        contents (None for a new folder). Writes nothing."""
        stored = self.stored()
        if stored is None:
            return None
        if stored['hash'] != settings_hash(settings):
            changed = _changed(stored['settings'], settings)
            raise UsageError(f'--out {self.out}: holds a run with other settings: {changed}; give a new folder, or '
                             'the same settings with --resume')
        old = stored['prompts']
        for i, (a, b) in enumerate(zip(old, prompts)):
            if a != b:
                raise UsageError(f'--prompts: prompt {i + 1} is {b!r}, the run in --out has {a!r} there; a run is '
                                 'extended by appending prompts (or give a new --out)')
        if not resume:
            raise UsageError(f'--out {self.out}: holds this run already; pass --resume to continue or extend it')
        return stored

    def create(self, settings, prompts, split=None):
        """Write settings.json: the settings, the longer prompt list of the stored run and this one, and the
        tuning ``split`` of the run that created the folder (kept by every later run). Makes the images folder."""
        stored = self.stored()
        self.images.mkdir(parents=True, exist_ok=True)
        if stored is not None:
            if len(stored['prompts']) >= len(prompts):
                return
            split = stored.get('split')
        data = {'hash': settings_hash(settings), 'settings': settings, 'prompts': list(prompts), 'split': split}
        tmp = self.settings_path.with_suffix('.tmp')
        tmp.write_text(json.dumps(data, indent=1) + '\n', encoding='utf-8')
        os.replace(tmp, self.settings_path)             # never a half-written settings.json

    def shards(self):
        return sorted(self.out.glob('shard-*.jsonl'))

    def read(self):
        """The rows on disk and the skipped lines (:class:`Shards`); an unterminated last line is neither."""
        rows, skipped = {}, []
        for path in self.shards():
            lines = path.read_bytes().split(b'\n')[:-1]   # the part after the last newline is not a row yet
            for n, line in enumerate(lines, 1):
                row = _row(line)
                if row is None:
                    skipped.append((path.name, n))
                else:
                    rows.setdefault(key(row), row)
        return Shards([rows[k] for k in sorted(rows)], skipped)

    def rows(self):
        return self.read().rows

    def writer(self, rank):
        path = self.out / f'shard-{rank}.jsonl'
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b'\n'):         # drop a torn last line before appending
                with open(path, 'r+b') as f:
                    f.truncate(data.rfind(b'\n') + 1)
        return _Writer(path)


class _Writer:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row):
        data = (json.dumps(row) + '\n').encode('utf-8')
        while data:                                       # a regular file takes it in one call; loop regardless
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)
