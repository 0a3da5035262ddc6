"""The README's reading guide points into modsquad.py by line range; those ranges must stay true."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spans(path):
    """name -> (first line, last line) of every top-level class, function and assignment, and of class methods."""
    tree = ast.parse(open(path).read())
    out = {"__doc__": (tree.body[0].lineno, tree.body[0].end_lineno)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = (node.lineno, node.end_lineno)
            for sub in getattr(node, "body", []):
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = (sub.lineno, sub.end_lineno)
                    out.setdefault(sub.name, (sub.lineno, sub.end_lineno))
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = (node.lineno, node.end_lineno)
    return out


def test_reading_guide_line_ranges_match_modsquad_py():
    readme = open(os.path.join(ROOT, "README.md")).read()
    refs = re.findall(r"`([\w.]+)` \(modsquad\.py:L(\d+)-L(\d+)\)", readme)
    assert len(refs) >= 15
    actual = spans(os.path.join(ROOT, "modsquad.py"))
    wrong = [(name, int(a), int(b), actual.get(name)) for name, a, b in refs if actual.get(name) != (int(a), int(b))]
    assert not wrong, f"README ranges out of date (name, README, actual): {wrong}"
