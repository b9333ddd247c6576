"""The ``--out`` folder: ``settings.json`` (with the settings hash), one JSONL shard per process, images.

A row is written (and flushed to disk) as soon as its image is scored, so an interrupted run resumes from the rows
on disk; a torn last line (a process killed mid-write) is dropped. Rows are keyed by (prompt index, seed, method):
whichever process wrote a row, a restarted run of any size skips it.
"""
import hashlib
import json
import os
import pathlib

from ..errors import UsageError


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def key(row):
    return row['prompt_index'], row['seed'], row['method']


class Store:
    def __init__(self, out):
        self.out = pathlib.Path(out)
        self.images = self.out / 'images'

    def check(self, settings, resume):
        """Refuse an --out holding another run, or this run without --resume. Writes nothing."""
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f'--out {self.out}: is a file; give a folder')
        if not self.out.exists() or not any(self.out.iterdir()):
            return
        path = self.out / 'settings.json'
        if not path.is_file():
            raise UsageError(f'--out {self.out}: the folder is not empty and holds no eval run (settings.json); '
                             'give a new or empty folder')
        try:
            stored = json.loads(path.read_text())['hash']
        except (ValueError, KeyError):
            raise UsageError(f'--out {self.out}: settings.json is unreadable; give a new folder') from None
        if stored != settings_hash(settings):
            raise UsageError(f'--out {self.out}: holds a run with different settings (hash {stored}, these are '
                             f'{settings_hash(settings)}); give a new folder, or the same settings with --resume')
        if not resume:
            raise UsageError(f'--out {self.out}: holds this run already; pass --resume to continue it')

    def create(self, settings):
        self.images.mkdir(parents=True, exist_ok=True)
        path = self.out / 'settings.json'
        if not path.exists():
            path.write_text(json.dumps({'hash': settings_hash(settings), 'settings': settings}, indent=1) + '\n')

    def shards(self):
        return sorted(self.out.glob('shard-*.jsonl'))

    def rows(self):
        """Every complete row on disk, one per key (the first written), sorted by key."""
        rows = {}
        for path in self.shards():
            for line in path.read_text(encoding='utf-8').splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue            # a torn line from a killed process; its item is redone
                rows.setdefault(key(row), row)
        return [rows[k] for k in sorted(rows)]

    def writer(self, rank):
        path = self.out / f'shard-{rank}.jsonl'
        text = path.read_text(encoding='utf-8') if path.exists() else ''
        if text and not text.endswith('\n'):   # drop a torn last line before appending
            path.write_text(text[:text.rfind('\n') + 1], encoding='utf-8')
        return _Writer(path)


class _Writer:
    def __init__(self, path):
        self.file = open(path, 'a', encoding='utf-8')

    def write(self, row):
        self.file.write(json.dumps(row) + '\n')
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()
