"""Rendering the alert with Jinja: our templates by default, the site's own (old HPC ASSyncy ones too) when configured.

Every template gets `alert` (epnalert.alert.Alert) and `subject`, and the two strings the old
templates used: `epn_details` (a text block per unknown EPN with a visit) and `unknown_epns`
(a text table of unknown EPNs without a visit, eight to a row). Whatever the template, the email
says which sources failed and which names are suspicious: if a part does not show them, our
own notice is put at its top.
"""

import dataclasses
import functools
import html as htmllib
import importlib.resources
import re
import unicodedata

import jinja2

from mxsync.errors import MailError

DEFAULT_TEXT = "epnalert-text.j2"
DEFAULT_HTML = "epnalert-html.j2"
NOTICE_TEXT = "epnalert-notice-text.j2"
NOTICE_HTML = "epnalert-notice-html.j2"
UNKNOWN = "unknown"


def render_email(config, alert, subject):
    """Given the config and an alert, return (text, html); html is None if only a text template is configured."""
    text, html, _ = _render_parts(config, alert, subject)
    return text, html


def _render_parts(config, alert, subject):
    """Return (text, html, the parts that got our notice because their template did not show it all)."""
    alert, subject = clean_alert(alert), printable(subject)
    values = template_values(alert, subject)
    if config.template_folder is None:
        loader, strict = _package_loader(), True
        text_name, html_name = DEFAULT_TEXT, DEFAULT_HTML
    else:
        # The site's templates may be the old ones: lenient about undefined names, whitespace as the old tool had it.
        loader, strict = jinja2.FileSystemLoader(str(config.template_folder)), False
        text_name, html_name = config.template_text, config.template_html
    # The built-in templates show every failed source and suspicious name themselves (the tests hold them to it);
    # looking for thousands of names in a big email costs seconds, so only the site's templates are searched.
    html, noticed, search = None, [], config.template_folder is not None
    if html_name:
        rendered = _render(_environment(loader, html=True, strict=strict), html_name, values)
        html = with_notice_html(rendered, alert) if search else rendered
        noticed += [html_name] if html != rendered else []
    if text_name:
        rendered = _render(_environment(loader, html=False, strict=strict), text_name, values)
        text = with_notice_text(rendered, alert) if search else rendered
        noticed += [text_name] if text != rendered else []
    else:
        text = html_to_text(html)  # carries the HTML part's notice, if it got one
    return text, html, noticed


def check_templates(config):
    """Render the configured templates (or the built-in ones) and the message on sample data; return a one-line detail.

    Raises MailError naming the template file and line on a syntax or render error; `mxsync check` calls it.
    """
    from epnalert.alert import SUBJECT, compose

    sample = sample_alert(config)
    _, _, noticed = _render_parts(config, sample, SUBJECT)
    compose(config, sample)  # the whole message too, headers and encoding included
    if config.template_folder is None:
        return "built-in templates render on sample data"
    names = " and ".join(name for name in (config.template_text, config.template_html) if name)
    detail = f"{names} in {config.template_folder} render on sample data"
    if noticed:
        detail += f" ({' and '.join(noticed)} do not show failed sources or suspicious names; epnalert adds its notice)"
    return detail


def render_pair(folder, text_name, html_name, values):
    """Render a text and an HTML template, each from `folder` when it has it, else the built-in one; return both.

    Strict (an undefined name is an error), HTML autoescaped; a failure is one MailError naming file and line.
    """
    loader = _package_loader()
    if folder is not None:
        loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(folder)), loader])
    text = _render(_environment(loader, html=False, strict=True), text_name, values)
    html = _render(_environment(loader, html=True, strict=True), html_name, values)
    return text, html


def sample_alert(config, now=None):
    """Return an Alert of made-up EPNs with awkward names (non-ASCII, HTML, a line break), a failed source and a suspicious name."""
    import socket
    from datetime import datetime, timedelta

    from epnalert.alert import Alert, UnknownEpn
    from epnalert.sources import PORTAL, SFTP, SourceFailure
    from mxsync.portal import Person, Suspicious, Visit

    now = (now or datetime.now()).astimezone()
    day = timedelta(days=1)
    zoe = Person("Zoë", "Ångström", "zoe.angstrom@example.org")
    bob = Person('<b>Bob</b> & "Co"', "O'Brien", "bob@example.org")
    eve = Person("Eve\r\n\r\nepn_cap_map:", "Mallory", "")
    past = Visit("20001a", now - 3 * day, now - 2 * day, 23, "mx", zoe, (bob, eve))
    booked = Visit("30003c", now + 2 * day, now + 3 * day, 24, "mx2", None, ())
    return Alert(
        unknown=[
            UnknownEpn("20001a", ("/data/mx",), (past,), ("mx",), new=True),
            UnknownEpn("30003c", (), (booked,), ("mx2",), new=True),
            UnknownEpn(
                "20002b",
                ("/data/mx",),
                (),
                ("mx",),
                new=False,
                first_alerted=now - 7 * day,
            ),
        ],
        suspicious=[Suspicious(f"{SFTP} /data/mx", "'lost+found'", "not an EPN (sample)")],
        failed_sources=[SourceFailure(PORTAL, "equipment 24 (mx2)", "HTTP 503 <Service Unavailable> (sample)")],
        generated_at=now,
        window_start=now - 30 * day,
        window_end=now + 7 * day,
        previous_sent_at=now - day,
        config_path=str(config.path),
        hostname=socket.gethostname(),
        map_file=str(config.epn_cap_map_file or ""),
    )


def template_values(alert, subject):
    return {
        "alert": alert,
        "subject": subject,
        "epn_details": legacy_epn_details(alert),
        "unknown_epns": legacy_unknown_epns(alert),
    }


def _package_loader():
    return jinja2.FunctionLoader(_default_template)


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
    """Render one template; any failure, whatever the site's template raises, is one MailError naming file and line."""
    try:
        return environment.get_template(name).render(**values)
    except jinja2.TemplateNotFound as error:
        where = getattr(environment.loader, "searchpath", ["the epnalert package"])
        missing = f"{error.name} (included by {name})" if error.name != name else name
        raise MailError(f"template {missing}: not found in {', '.join(map(str, where))}") from None
    except jinja2.TemplateSyntaxError as error:
        raise MailError(f"template {error.filename or name}, line {error.lineno}: {error.message}") from None
    except Exception as error:  # noqa: BLE001 - a template is code: it can raise anything (undefined names, 1/0...)
        filename, line = _template_frame(error, name)
        summary = " ".join(str(error).split()) or type(error).__name__
        raise MailError(f"template {filename}{line}: cannot render it: {summary}") from None


def _template_frame(error, name):
    """Return (file, ', line N') of the innermost template line in error's traceback, or (name, '') if none."""
    found = (name, "")
    traceback = error.__traceback__
    while traceback is not None:
        # Jinja rewrites the traceback so that template frames carry the template's file and line.
        if "__jinja_exception__" in traceback.tb_frame.f_globals:
            filename = traceback.tb_frame.f_code.co_filename
            found = (
                name if filename == "<template>" else filename,
                f", line {traceback.tb_lineno}",
            )
        traceback = traceback.tb_next
    return found


# ---------------------------------------------------------------- names from outside


def printable(text):
    """Given text from outside (a name, a folder, an error), return it with CR, LF, U+2028, bidi overrides etc. escaped.

    Letters of any script stay; `\\r\\n` shows as such, so a crafted name cannot start a line of its own in the email.
    """
    if text.isprintable():
        return text
    return "".join(
        character.encode("unicode_escape").decode("ascii") if _hidden(character) else character for character in text
    )


def _hidden(character):
    # Controls, format characters (bidi overrides, zero-width), line and paragraph separators, unassigned code points.
    return unicodedata.category(character) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def clean_alert(value):
    """Return an Alert (or any part of one) with every string passed through printable(); unchanged parts are reused."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, (list, tuple)):
        items = [clean_alert(item) for item in value]
        return value if all(new is old for new, old in zip(items, value)) else type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for name in _init_fields(type(value)):
            old = getattr(value, name)
            new = clean_alert(old)
            if new is not old:
                changes[name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


@functools.cache
def _init_fields(cls):
    return tuple(field.name for field in dataclasses.fields(cls) if field.init)


# ---------------------------------------------------------------- the notice of failures and suspicious names


def with_notice_text(text, alert):
    """Return the text part, with our notice on top if it does not show every failed source and suspicious name."""
    failed, suspicious = unreported(alert, text)
    if not (failed or suspicious):
        return text
    return _render_notice(NOTICE_TEXT, html=False, failed=failed, suspicious=suspicious) + text


def with_notice_html(html, alert):
    """Return the HTML part, with our notice at the top of its body if it does not show them all."""
    if not (alert.failed_sources or alert.suspicious):
        return html
    # Tags out, entities decoded: enough to see whether a text is shown, and linear (a parser is not, at 10,000 rows).
    failed, suspicious = unreported(alert, htmllib.unescape(re.sub(r"<[^>]*>", " ", html)))
    if not (failed or suspicious):
        return html
    notice = _render_notice(NOTICE_HTML, html=True, failed=failed, suspicious=suspicious)
    at = 0
    for opening in (r"<body\b[^>]*>", r"</head\s*>", r"<html\b[^>]*>"):
        # Values are escaped, so the first such tag is the template's own.
        match = re.search(opening, html, re.IGNORECASE)
        if match:
            at = match.end()
            break
    return html[:at] + "\n" + notice + html[at:]


def unreported(alert, shown):
    """Given what a part shows, return (failed sources, suspicious records), each all of them if any is missing, else []."""
    shown = " ".join(shown.split())

    def missing(*texts):
        return any(" ".join(text.split()) not in shown for text in texts)

    failed = alert.failed_sources if any(missing(f.part, f.reason) for f in alert.failed_sources) else []
    suspicious = alert.suspicious if any(missing(s.name, s.reason) for s in alert.suspicious) else []
    return list(failed), list(suspicious)


def _render_notice(name, html, failed, suspicious):
    environment = _environment(_package_loader(), html=html, strict=True)
    return _render(environment, name, {"failed_sources": failed, "suspicious": suspicious})


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
            principal = f"{person.first_names} {person.last_name} {person.email}" if person else "not listed"
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
PARAGRAPH_TAGS = (
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "blockquote",
    "hr",
    "table",
)
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
            rows = [
                [_cell_text(cell) for cell in row.find_all(["th", "td"], recursive=False)]
                for row in table.find_all("tr")
            ]
            table.replace_with(
                BLOCK_BREAK * 2 + BLOCK_BREAK.join(" | ".join(cells) for cells in rows) + BLOCK_BREAK * 2
            )
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
