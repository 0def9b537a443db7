"""py.report(title, rows): an HTML report rendered with Jinja2 (bundled from
report.requirements.txt), autoescaped, with a total row."""
from jinja2 import Environment, select_autoescape

from taskhost import task

TEMPLATE = Environment(autoescape=select_autoescape(default=True)).from_string(
    """<h1>{{ title }}</h1>
<table>
{%- for row in rows %}
<tr><td>{{ row.name }}</td><td>{{ "%.2f"|format(row.amount) }}</td></tr>
{%- endfor %}
<tr><th>Total</th><th>{{ "%.2f"|format(total) }}</th></tr>
</table>"""
)


@task(bind=True)
def report(ctx, title, rows):
    ctx.update_state("RENDERING", {"rows": len(rows)})
    return TEMPLATE.render(title=title, rows=rows, total=sum(r["amount"] for r in rows))
