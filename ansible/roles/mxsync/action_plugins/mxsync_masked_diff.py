"""Action of the mxsync role: show two texts (secrets already masked) as --diff shows a changed file; change nothing.

config.yml's own template task hides its diff (it holds passwords); this shows it, masked, in the usual format.
"""

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    """Report `before` -> `after` of `path` as a diff, changed when they differ; runs on the controller only."""

    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        before = self._task.args.get("before", "")
        after = self._task.args.get("after", "")
        path = self._task.args.get("path", "")
        result["changed"] = before != after
        result["diff"] = {
            "before": before,
            "after": after,
            "before_header": f"{path} (installed, secrets masked)",
            "after_header": f"{path} (from the role, secrets masked)",
        }
        return result
