"""Rendering the alert with Jinja: our templates by default, the site's own (old HPC ASSyncy ones too) when configured.

Every template gets `alert` (epnalert.alert.Alert) and `subject`, and the two strings the old
templates used: `epn_details` (a text block per unknown EPN with a visit) and `unknown_epns`
(a text table of unknown EPNs without a visit, eight to a row).
"""

import importlib.resources
import re

import jinja2

from mxsync.errors import MailError

DEFAULT_TEXT = "epnalert-text.j2"
DEFAULT_HTML = "epnalert-html.j2"
UNKNOWN = "unknown"


def render_email(config, alert, subject):
    """Given the config and an alert, return (text, html); html is None if only a text template is configured."""
    values = template_values(alert, subject)
    if config.template_folder is None:
        loader, strict = jinja2.FunctionLoader(_default_template), True
        text_name, html_name = DEFAULT_TEXT, DEFAULT_HTML
    else:
        # The site's templates may be the old ones: lenient about undefined names, whitespace as the old tool had it.
        loader, strict = jinja2.FileSystemLoader(str(config.template_folder)), False
        text_name, html_name = config.template_text, config.template_html
    html = _render(_environment(loader, html=True, strict=strict), html_name, values) if html_name else None
    text = _render(_environment(loader, html=False, strict=strict), text_name, values) if text_name else html_to_text(html)
    return text, html


def template_values(alert, subject):
    return {
        "alert": alert,
        "subject": subject,
        "epn_details": legacy_epn_details(alert),
        "unknown_epns": legacy_unknown_epns(alert),
    }


def _default_template(name):
    resource = importlib.resources.files("epnalert.templates").joinpath(name)
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _environment(loader, html, strict):
    environment = jinja2.Environment(
        loader=loader,
        autoescape=html,
        undefined=jinja2.StrictUndefined if strict else jinja2.Undefined,
        trim_blocks=strict,
        lstrip_blocks=strict,
        keep_trailing_newline=True,
    )
    environment.filters["when"] = format_time
    environment.filters["person"] = format_person
    return environment


def _render(environment, name, values):
    try:
        return environment.get_template(name).render(**values)
    except jinja2.TemplateNotFound:
        where = getattr(environment.loader, "searchpath", ["the epnalert package"])
        raise MailError(f"template {name}: not found in {', '.join(map(str, where))}") from None
    except jinja2.TemplateSyntaxError as error:
        raise MailError(f"template {error.filename or name}, line {error.lineno}: {error.message}") from None
    except jinja2.TemplateError as error:
        raise MailError(f"template {name}: cannot render it: {error}") from None


# ---------------------------------------------------------------- filters


def format_time(moment):
    """Given an aware datetime (or None), return e.g. '2024-04-28 09:00 +10:00' in its own offset."""
    if moment is None:
        return UNKNOWN
    offset = moment.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:5]}" if offset else ""
    return f"{moment:%Y-%m-%d %H:%M} {offset}".rstrip()


def format_person(person):
    """Given a portal Person (or None), return 'First Last <email>'."""
    if person is None:
        return "not listed"
    name = person.name or "(no name)"
    return f"{name} <{person.email}>" if person.email else name


# ---------------------------------------------------------------- the old templates' variables


def legacy_epn_details(alert):
    """Return the old `epn_details`: for each visit of an unknown EPN, the block HPC ASSyncy wrote."""
    blocks = []
    for item in alert.unknown:
        for visit in item.visits:
            person = visit.principal_scientist
            principal = " ".join((person.first_names, person.last_name, person.email)) if person else "not listed"
            scientists = [[p.first_names, p.last_name, p.email] for p in visit.data_scientists]
            blocks.append(
                f"Epn {item.epn} on {visit.start.isoformat() if visit.start else UNKNOWN} is not known.\n"
                f"Principal scientist: {principal}\n"
                "It includes scientists: \n"
                f"{text_table(scientists, headers=['First name', 'Last name', 'Email'])}\n"
                "** Please add it the config. **\n\n"
            )
    return "".join(blocks)


def legacy_unknown_epns(alert):
    """Return the old `unknown_epns`: unknown EPNs without a visit, sorted, eight to a row, in a ruled text table."""
    epns = sorted(item.epn for item in alert.without_visit)
    return text_table([epns[index : index + 8] for index in range(0, len(epns), 8)])


def text_table(rows, headers=None):
    """Given rows of strings, return them in left-aligned columns (two spaces apart) with dashed rules."""
    if not rows and not headers:
        return ""
    columns = max([len(row) for row in rows] + [len(headers or [])])
    widths = [
        max([len(row[index]) for row in rows if index < len(row)] + [len(headers[index]) if headers else 0])
        for index in range(columns)
    ]

    def line(cells):
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    body = [line(row) for row in rows]
    return "\n".join([line(headers), rule] + body if headers else [rule] + body + [rule])


# ---------------------------------------------------------------- text from HTML

# Stand-ins while the layout is worked out: a <br>, and a line break around a block.
LINE_BREAK, BLOCK_BREAK = "\x01", "\x02"
PARAGRAPH_TAGS = ("p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "blockquote", "hr", "table")
LINE_TAGS = ("div", "li", "tr", "dt", "dd")


def html_to_text(html):
    """Given an HTML email, return a readable text version: table rows as lines of ' | '-separated cells."""
    from bs4 import BeautifulSoup, NavigableString

    page = BeautifulSoup(html, "html.parser")
    for tag in page(["head", "script", "style"]):
        tag.decompose()
    # <pre> keeps its layout: set aside now, put back at the end.
    preformatted = []
    for tag in page.find_all("pre"):
        preformatted.append(tag.get_text().strip("\n"))
        tag.replace_with(f"{BLOCK_BREAK * 2}\x00{len(preformatted) - 1}\x00{BLOCK_BREAK * 2}")
    for tag in page.find_all("a"):
        href = tag.get("href", "").removeprefix("mailto:")
        text = tag.get_text(" ", strip=True)
        tag.replace_with(f"{text} ({href})" if href and href not in text else text)
    for tag in page.find_all("br"):
        tag.replace_with(LINE_BREAK)
    # Elsewhere white space (the template's own line breaks included) is just a space, as a browser shows it.
    for string in page.find_all(string=True):
        if type(string) is NavigableString:
            string.replace_with(re.sub(r"\s+", " ", string))
    for table in page.find_all("table"):
        if table.find_parent("table") is None:
            rows = [[_cell_text(cell) for cell in row.find_all(["th", "td"], recursive=False)] for row in table.find_all("tr")]
            table.replace_with(BLOCK_BREAK * 2 + BLOCK_BREAK.join(" | ".join(cells) for cells in rows) + BLOCK_BREAK * 2)
    for tags, breaks in ((PARAGRAPH_TAGS, BLOCK_BREAK * 2), (LINE_TAGS, BLOCK_BREAK)):
        for tag in page.find_all(tags):
            tag.insert_before(breaks)
            tag.insert_after(breaks)
    text = page.get_text().replace(LINE_BREAK, "\n").replace(BLOCK_BREAK, "\n")
    text = "\n".join(line.strip() for line in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    text = re.sub(r"\x00(\d+)\x00", lambda match: preformatted[int(match.group(1))], text)
    return text + "\n"


def _cell_text(cell):
    """Return a table cell's text on one line; lines broken by <br> are joined with '; '."""
    lines = (" ".join(line.split()) for line in cell.get_text().split(LINE_BREAK))
    return "; ".join(line for line in lines if line)
