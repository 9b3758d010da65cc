"""One self-contained HTML page from strings, tables and PNG figures (embedded as base64 data URIs):
the writer of experiments/report_figure4.py's page. Standard library only; every text is escaped.

Each table is written from the rows of a CSV file (``csv_table``) and carries its name
(``data-csv``), so that every number shown is the CSV's own string."""
import base64
import html

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: .6em 1em; font-weight: bold; }
table { border-collapse: collapse; font-size: .75em; margin: .5em 0 1.5em; }
.wide { overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: .15em .5em; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; white-space: normal; vertical-align: bottom; }
td.text { text-align: left; white-space: normal; max-width: 40em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
code { background: #f5f5f5; padding: 0 .2em; }
"""


def escape(text):
    return html.escape(str(text), quote=True)


def data_uri(png_bytes):
    """A PNG as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def figure(png_bytes, caption):
    return (f'<figure><img src="{data_uri(png_bytes)}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def paragraph(text):
    return f"<p>{escape(text)}</p>"


def bullet_list(items):
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_table(columns, rows, csv_name):
    """A table of ``rows`` (lists of strings, as written to ``csv_name``) under ``columns``: the cells
    are the CSV's strings; numbers right-aligned, text left-aligned; column names may break after an
    underscore, and a table wider than the page scrolls in its own box."""
    head = "".join(f"<th>{escape(c).replace('_', '_<wbr>')}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" if _is_number(cell)
                                    else f'<td class="text">{escape(cell)}</td>' for cell in row) + "</tr>"
                   for row in rows)
    return (f'<p>From <a href="{escape(csv_name)}">{escape(csv_name)}</a>.</p>'
            f'<div class="wide"><table data-csv="{escape(csv_name)}"><thead><tr>{head}</tr></thead><tbody>{body}'
            "</tbody></table></div>")


def details(summary, inner):
    """A folded section (long tables)."""
    return f"<details><summary>{escape(summary)}</summary>{inner}</details>"


def page(title, banner, sections):
    """The whole page: ``sections`` are (heading, inner HTML) pairs; ``banner`` a warning shown on top
    (None: none)."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"]
    if banner:
        parts.append(f'<div class="banner">{escape(banner)}</div>')
    for heading, inner in sections:
        parts.append(f"<section><h2>{escape(heading)}</h2>{inner}</section>")
    parts.append("</body></html>\n")
    return "".join(parts)
