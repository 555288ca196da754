#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb without Quarto (what `nbdev_readme` does where Quarto is installed).

index.ipynb holds markdown cells and hidden code cells only, so the README is its markdown cells in order.
`--check` exits 1 when README.md is out of date.
"""
import json, sys
from pathlib import Path

def readme_text(nb_path='nbs/index.ipynb'):
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if c['cell_type'] == 'markdown': parts.append(src)
        elif not src.startswith('#| hide'): parts.append(f'```python\n{src}\n```')
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    root = Path(__file__).resolve().parent.parent
    text = readme_text(root/'nbs'/'index.ipynb')
    if '--check' in sys.argv:
        if (root/'README.md').read_text() != text: sys.exit('README.md is out of date: run `make readme`')
    else: (root/'README.md').write_text(text)
