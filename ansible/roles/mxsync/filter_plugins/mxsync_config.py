"""Filters of the mxsync role: compare the installed config.yml with the one the role renders.

They run on the controller (Ansible's Python has PyYAML), in check mode too, and never print a secret:
every value of a key naming a password, secret or token is masked before anything is compared or shown.
"""

import difflib
import re

import yaml

ROLE_COMMENT = "Managed by Ansible (role mxsync)"
CARRIED_START = "# --- carried over: keys the role does not set, kept from the earlier config.yml ---"
CARRIED_END = "# --- end of carried over ---"
MASK = '"********"'
# A key naming a secret: its value is masked wherever and however it is written.
SECRET_KEY = re.compile(r"password|secret|token", re.IGNORECASE)
UNREADABLE = "# (not shown: this text does not parse as YAML, and it may hold passwords)\n"


def mask_secrets(text):
    """Given YAML text, return it with the value of every password, secret or token key masked.

    The spans come from the YAML parser (plain, quoted, flow and block values alike, '#' or ',' inside them
    included); text that does not parse is not shown at all rather than masked by guesswork.
    """
    if not text:
        return text
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return UNREADABLE
    spans = []
    nodes = [root] if root is not None else []
    while nodes:
        node = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and SECRET_KEY.search(str(key.value)):
                    spans.append((value.start_mark.index, value.end_mark.index))
                else:
                    nodes.append(value)
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)
    for start, end in sorted(spans, reverse=True):
        # A block value's span ends after its last line break: keep that break.
        masked_end = end - 1 if text[start:end].endswith("\n") else end
        text = text[:start] + MASK + text[masked_end:]
    return text


def _mapping(text):
    """Given YAML text, return its top-level mapping, or {} for no text or one that is not a mapping."""
    if not text:
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _carried_section(text):
    """Given an installed config.yml the role wrote, return the keys of its carried-over section."""
    if CARRIED_START not in text or CARRIED_END not in text:
        return {}
    section = text.split(CARRIED_START, 1)[1].split(CARRIED_END, 1)[0]
    return _mapping(section)


def _normal(key, value):
    """Given a config value, return a form in which equal settings compare equal (1 == 1.0, 'a' == ['a'])."""
    if key == "log-level" and isinstance(value, str):
        value = value.strip().upper()
        return value[len("LOGGING.") :] if value.startswith("LOGGING.") else value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        items = [_normal(key, item) for item in value]
        return items[0] if len(items) == 1 else items
    if isinstance(value, dict):
        return {str(name): _normal(name, item) for name, item in value.items() if item is not None}
    text = str(value)
    try:
        return float(text)
    except ValueError:
        return text


def _holds_secret(key, value):
    if SECRET_KEY.search(str(key)):
        return True
    if isinstance(value, dict):
        return any(_holds_secret(name, item) for name, item in value.items())
    if isinstance(value, list):
        return any(_holds_secret(key, item) for item in value)
    return False


def _show(value):
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def mxsync_config_upgrade(installed_text, rendered_text, key_variables, extra_keys=(), path="config.yml"):
    """Given the installed config.yml (or ''), the role's rendering and {managed key: variable}, say how to upgrade.

    Returns a dict: installed, adopted (installed but not written by the role), carried (keys kept), carried_yaml (the
    block to append), differences (one line per setting the role would change on adoption), relocated, cap_map (the
    installed epn_cap_map, for the map file), masked_installed and masked_new (both texts, secrets masked).
    """
    installed_text = installed_text or ""
    old = _mapping(installed_text)
    new = _mapping(rendered_text)
    adopted = bool(installed_text) and old.get("comment") != ROLE_COMMENT
    candidates = old if adopted else _carried_section(installed_text)
    carried = {
        key: value
        for key, value in candidates.items()
        if key not in new and key not in key_variables and key not in set(extra_keys)
    }
    carried_yaml = ""
    if carried:
        body = yaml.safe_dump(carried, default_flow_style=False, sort_keys=False, allow_unicode=True, width=1000)
        carried_yaml = f"{CARRIED_START}\n{body}{CARRIED_END}\n"
    differences, relocated = [], []
    if adopted:
        for key, variable in key_variables.items():
            if key not in old or key not in new or _normal(key, old[key]) == _normal(key, new[key]):
                continue
            if variable == "location":
                relocated.append(f"{key}: {_show(old[key])} -> {_show(new[key])}")
            elif variable:
                if _holds_secret(key, old[key]) or _holds_secret(key, new[key]):
                    shown = "installed and role values differ (not shown: they hold passwords)"
                else:
                    shown = f"installed {_show(old[key])}, role {_show(new[key])}"
                differences.append(f"{key}: {shown} ({variable})")
    cap_map = old.get("epn_cap_map") if adopted and isinstance(old.get("epn_cap_map"), dict) else {}
    return {
        "installed": bool(installed_text),
        "adopted": adopted,
        "carried": list(carried),
        "carried_yaml": carried_yaml,
        "differences": differences,
        "relocated": relocated,
        "cap_map": {str(number): str(project) for number, project in (cap_map or {}).items()},
        "masked_installed": mask_secrets(installed_text),
        "masked_new": mask_secrets(rendered_text + carried_yaml),
    }


def close_key(key, known_keys):
    """Given a config key nobody knows, return a line naming it and the likeliest key meant."""
    close = difflib.get_close_matches(str(key), list(known_keys), n=1)
    return f"unknown key {key!r}" + (f", did you mean {close[0]!r}?" if close else "")


class FilterModule:
    """The role's filters."""

    def filters(self):
        return {
            "mxsync_config_upgrade": mxsync_config_upgrade,
            "mxsync_mask_secrets": mask_secrets,
            "mxsync_close_key": close_key,
        }
