"""git with the token: nothing an agent leaves in HOME or the askpass helper can redirect it."""

from __future__ import annotations

from dispatch.gitops import ASKPASS, Git, write_askpass


def test_a_planted_gitconfig_and_askpass_cannot_capture_the_push(gitea, tmp_path, canary):
    gitea.add_repo("acme/app", git=True)
    state = tmp_path / "state"
    askpass = write_askpass(state)
    # what an unsandboxed agent could leave behind in git's HOME (the state dir)
    (state / ".gitconfig").write_text('[url "http://127.0.0.1:9/"]\n\tinsteadOf = http://\n')
    stolen = tmp_path / "stolen"
    askpass.write_text(f'#!/bin/sh\necho "$DISPATCH_GIT_PASSWORD" > {stolen}\necho wrong\n')

    clone = tmp_path / "clone"
    git = Git(cwd=clone, askpass=askpass, token=canary)
    git.clone(f"{gitea.url}/acme/app.git", clone)
    (clone / "f.txt").write_text("x\n")
    git.commit_all("add f")
    git.push("dispatch/1-x")

    assert "dispatch/1-x" in gitea.git_branches("acme/app")  # went to the real forge
    assert not stolen.exists()
    assert askpass.read_text() == ASKPASS  # restored before use
    assert canary not in (clone / ".git" / "config").read_text()
