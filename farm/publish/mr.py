"""Merge requests on GitLab: create one for a branch, or update the one that is open for it.

Through the API (python-gitlab: project lookup, merge request list/create/update), or through git
push options (``-o merge_request.create -o merge_request.target=...``), which GitLab acts on when
the branch is pushed. The token never appears in a message: errors are scrubbed of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from farm.errors import FarmError
from farm.publish.git import Git, scrub


class MergeRequestError(FarmError):
    """GitLab refused or could not be reached."""


@dataclass(frozen=True)
class MergeRequest:
    url: str | None
    iid: int | None
    action: str  # created | updated | pushed (push options: GitLab acts on its own)


def open_or_update(url: str, project: str, token: str, source_branch: str, target_branch: str, title: str,
                   description: str, timeout: float = 30.0) -> MergeRequest:
    """The open merge request from source_branch updated (title, description), else a new one."""
    import gitlab
    import requests

    try:
        gl = gitlab.Gitlab(url, private_token=token, timeout=timeout, retry_transient_errors=False)
        proj = gl.projects.get(project)
        existing = proj.mergerequests.list(source_branch=source_branch, state="opened", get_all=True)
        if existing:
            mr = existing[0]
            mr.title = title
            mr.description = description
            mr.target_branch = target_branch
            mr.save()
            return MergeRequest(getattr(mr, "web_url", None), getattr(mr, "iid", None), "updated")
        mr = proj.mergerequests.create({
            "source_branch": source_branch, "target_branch": target_branch, "title": title,
            "description": description, "remove_source_branch": True,
        })
        return MergeRequest(getattr(mr, "web_url", None), getattr(mr, "iid", None), "created")
    except gitlab.exceptions.GitlabAuthenticationError as e:
        raise MergeRequestError(scrub(f"GitLab at {url} refused the token ({e.response_code}): check "
                                      "FARM_GITLAB_TOKEN_FILE (scope api)", [token])) from None
    except gitlab.exceptions.GitlabGetError as e:
        raise MergeRequestError(scrub(f"GitLab at {url}: project {project!r}: {e.error_message} "
                                      f"({e.response_code})", [token])) from None
    except gitlab.exceptions.GitlabError as e:
        raise MergeRequestError(scrub(f"GitLab at {url}: merge request for {source_branch}: {e.error_message} "
                                      f"({e.response_code})", [token])) from None
    except requests.RequestException as e:
        raise MergeRequestError(scrub(f"GitLab at {url} cannot be reached: {type(e).__name__}", [token])) from None


def push_options(target_branch: str, title: str) -> list[str]:
    """GitLab's push options that open (or keep) a merge request for the pushed branch."""
    return ["merge_request.create", f"merge_request.target={target_branch}", f"merge_request.title={title}",
            "merge_request.remove_source_branch"]


def push(git: Git, remote: str, branch: str, options: list[str] | None = None) -> None:
    """Force-push branch to remote (the farm owns its branches there), with push options if given."""
    args = ["push", "--force", "--porcelain"]
    for option in options or []:
        args += ["-o", option]
    git.run(*args, remote, f"refs/heads/{branch}:refs/heads/{branch}", what=f"pushing {branch} to {remote}")
