"""The import layering, read from the source with ``ast``: the library never imports the command line, the module
graph has no cycle, and no module uses another module's private (leading-underscore) names.

Layers, bottom to top: the library (``w2sd_samplers`` and its subpackages); the commands (``w2sd_samplers.cli``,
the ``w2sd`` entry point, and ``w2sd_samplers.commands``, whose ``common`` imports no command); the hosts in
``wrappers/``. ``python -m w2sd_samplers.eval`` and ``python -m w2sd_samplers.bench`` are entry points like
``cli``: their ``__main__`` modules run a command, so they may import ``commands``; nothing imports them.

Every import counts, also one inside a function (a lazy import is still a dependency). A module named with a
leading underscore (``_kdiff``, which resolves the host's k-diffusion copy) is internal to the project, not to
one module: the library and its hosts share it. A leading-underscore name defined in a module is that module's
own.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# source roots: a module's name is its dotted path below its root
ROOTS = {ROOT: ['w2sd_samplers'], ROOT / 'wrappers' / 'sd_webui': ['w2sd_sdwebui', 'scripts'],
         ROOT / 'wrappers': ['comfyui']}
ENTRY_POINTS = {'w2sd_samplers.cli', 'w2sd_samplers.eval.__main__', 'w2sd_samplers.bench.__main__'}


def project_sources():
    """``{module name: (source, is_package)}`` of the package and the wrappers."""
    sources = {}
    for root, tops in ROOTS.items():
        for top in tops:
            for path in sorted((root / top).rglob('*.py')):
                parts = path.relative_to(root).with_suffix('').parts
                package = parts[-1] == '__init__'
                sources['.'.join(parts[:-1] if package else parts)] = (path.read_text(encoding='utf-8'), package)
    return sources


def private(name):
    return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


def analyse(sources):
    """``(edges, violations)``: ``edges[m]`` the project modules ``m`` imports; ``violations`` lines
    ``'m: uses other._name'`` for each private name of another module that ``m`` imports or reads."""
    edges, violations = {}, []
    for name, (source, package) in sources.items():
        here = name if package else name.rpartition('.')[0]
        imported, bound = set(), {}          # bound: local name -> project module it refers to

        def use(module, attr):
            if private(attr) and module != name:
                violations.append(f'{name}: uses {module}.{attr}')

        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in sources:
                        imported.add(alias.name)
                        bound[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = here.split('.')[:len(here.split('.')) - node.level + 1] if node.level else []
                target = '.'.join(base + (node.module.split('.') if node.module else []))
                for alias in node.names:
                    sub = f'{target}.{alias.name}'
                    if sub in sources:       # a submodule: internal modules (_kdiff) are the project's
                        imported.add(sub)
                        bound[alias.asname or alias.name] = sub
                    elif target in sources:
                        imported.add(target)
                        use(target, alias.name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.insert(0, value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in bound:
                    module = bound[value.id]
                    for attr in chain:       # a.b._c: follow submodules, then check the first other name
                        if f'{module}.{attr}' in sources:
                            module = f'{module}.{attr}'
                            continue
                        use(module, attr)
                        break
        edges[name] = imported - {name}
    return edges, violations


def cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def command_line(module):
    return module in ENTRY_POINTS or module == 'w2sd_samplers.commands' or \
        module.startswith('w2sd_samplers.commands.')


@pytest.fixture(scope='module')
def graph():
    edges, violations = analyse(project_sources())
    # the reading itself: the package's own imports are seen (a broken reader would pass every check below)
    assert 'w2sd_samplers.reflect' in edges['w2sd_samplers.sampling']
    assert 'w2sd_samplers.generate' in edges['w2sd_samplers.commands.generate']
    assert sum(map(len, edges.values())) > 60
    return edges, violations


def test_no_import_cycle(graph):
    edges, _ = graph
    assert cycles(edges) == []


def layering_faults(edges):
    """``{module: [command-line modules it imports]}`` for library modules and for ``commands.common``."""
    lower = [m for m in edges if m.startswith('w2sd_samplers') and not command_line(m)]
    faults = {m: sorted(t for t in edges[m] if command_line(t)) for m in lower + ['w2sd_samplers.commands.common']}
    return {m: t for m, t in faults.items() if t}


def test_the_library_never_imports_the_command_line_nor_common_a_command(graph):
    edges, _ = graph
    assert len([m for m in edges if m.startswith('w2sd_samplers') and not command_line(m)]) > 30
    assert layering_faults(edges) == {}


def test_no_private_name_is_used_across_modules(graph):
    _, violations = graph
    assert violations == []


def test_the_checks_find_what_they_look_for():
    # a stand-in project with each fault once: a cycle through a lazy import, a library module importing a
    # command, a private name imported, read off a module, and reached through a package
    sources = {
        'w2sd_samplers': ('', True),
        'w2sd_samplers.a': ('from . import b\nfrom .b import _hidden\n', False),
        'w2sd_samplers.b': ('def f():\n    from .a import g\n', False),
        'w2sd_samplers.c': ('from .commands import common\nimport w2sd_samplers.b as bee\nbee._x()\n', False),
        'w2sd_samplers.d': ('import w2sd_samplers\nw2sd_samplers.b._y\nfrom . import _kdiff\n', False),
        'w2sd_samplers._kdiff': ('', False),
        'w2sd_samplers.commands': ('', True),
        'w2sd_samplers.commands.common': ('from . import demo\n', False),
        'w2sd_samplers.commands.demo': ('from ..d import thing\n', False),
    }
    edges, violations = analyse(sources)
    assert cycles(edges) == [['w2sd_samplers.a', 'w2sd_samplers.b']]
    assert layering_faults(edges) == {'w2sd_samplers.c': ['w2sd_samplers.commands.common'],
                                      'w2sd_samplers.commands.common': ['w2sd_samplers.commands.demo']}
    assert edges['w2sd_samplers.d'] == {'w2sd_samplers', 'w2sd_samplers._kdiff'}
    assert sorted(violations) == ['w2sd_samplers.a: uses w2sd_samplers.b._hidden',
                                  'w2sd_samplers.c: uses w2sd_samplers.b._x',
                                  'w2sd_samplers.d: uses w2sd_samplers.b._y']
