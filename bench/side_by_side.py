"""The report of a taskhost-against-Celery scenario: each system's rate, its ratio to the
first (Celery's), and taskhost's against the target."""


def report_side_by_side(title, systems, key, target):
    base = next(iter(systems.values()))[key]
    print(title)
    for label, f in systems.items():
        print(f"  {label:28}{f[key]:>9.0f}/s  ({f['count']} tasks)  {f[key] / base:>6.1f}x")
    th = [f for k, f in systems.items() if k.startswith("taskhost")][0][key]
    print(f"  taskhost / Celery: {th / base:.1f}x (target >= {target}x)")
