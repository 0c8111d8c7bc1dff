"""Template situations for git, the shell, SQL and HTTP APIs.

Facts the targets rely on: `git push --force` overwrites the remote branch unconditionally while
`--force-with-lease` refuses when the remote moved since the last fetch; `tar -f` takes the
archive name as its very next argument; `ln -s TARGET LINK_NAME`; `find -mtime +n` drops the
fractional day, so +6 means "at least 7 full days"; `col = NULL` is never true in SQL (use IS
NULL); aggregates cannot appear in WHERE (use HAVING); requests' `json=` serialises the object
itself, so passing `json.dumps(...)` sends a JSON string literal.
"""

from __future__ import annotations

from typing import Any

from dreamd.dream.grammar import LEX, Draft, code, pick, template

PEOPLE = LEX["people"]
TABLES = LEX["tables"]
NUMS = LEX["numeric_columns"]
LABELS = LEX["label_columns"]
BRANCHES = tuple(p + t for p in LEX["branch_prefixes"] for t in LEX["branch_topics"])
RUN_LEADS = ("", "Run:\n\n", "Here are the commands:\n\n", "This does it:\n\n")
SQL_LEADS = ("", "Here's the query:\n\n", "Query:\n\n")
SHAS = range(0x1000000, 0x10000000)  # 7 hex digits, as `git log --oneline` prints them


def sh(block: str) -> str:
    return code(block, "bash")


def sql(block: str) -> str:
    return code(block, "sql")


# ---- git --------------------------------------------------------------------------------------


@template("git", "accept", branch=BRANCHES, base=("main", "develop", "master"), lead=RUN_LEADS)
def git_new_branch(v: dict[str, Any]) -> Draft:
    b, base = v["branch"], v["base"]
    body = f"git switch {base}\ngit pull\ngit switch -c {b}\ngit push -u origin {b}"
    return Draft(f"create a branch `{b}` from an up-to-date `{base}` and push it to origin",
                 v["lead"] + sh(body))


@template("git", "accept", msg=LEX["commit_messages"], lead=RUN_LEADS, v=range(2))
def git_amend_message(v: dict[str, Any]) -> Draft:
    d = pick(v, "v", ("change the message of my last commit (not pushed yet) to \"{m}\"",
                      "reword my latest local commit to \"{m}\"; it hasn't been pushed"))
    return Draft(d.format(m=v["msg"]), v["lead"] + sh(f'git commit --amend -m "{v["msg"]}"'))


@template("git", "accept", k=range(1, 10), lead=RUN_LEADS, v=range(2))
def git_undo_keep_staged(v: dict[str, Any]) -> Draft:
    k = v["k"]
    what = "my last commit" if k == 1 else f"my last {k} commits"
    d = pick(v, "v", ("undo {w} but keep the changes staged", "uncommit {w}, keeping the changes in "
                      "the index"))
    return Draft(d.format(w=what), v["lead"] + sh(f"git reset --soft HEAD~{k}"))


@template("git", "accept", major=range(0, 6), minor=range(0, 30), patch=range(0, 20), lead=RUN_LEADS)
def git_tag_release(v: dict[str, Any]) -> Draft:
    t = f"v{v['major']}.{v['minor']}.{v['patch']}"
    body = f'git tag -a {t} -m "Release {t}"\ngit push origin {t}'
    return Draft(f"tag the current commit as release {t} (annotated) and push the tag", v["lead"] + sh(body))


@template("git", "accept", who=PEOPLE, days=range(1, 31), lead=RUN_LEADS)
def git_log_author(v: dict[str, Any]) -> Draft:
    body = f'git log --author="{v["who"]}" --since="{v["days"]} days ago" --oneline'
    return Draft(f"list {v['who']}'s commits from the last {v['days']} days, one line each",
                 v["lead"] + sh(body))


@template("git", "pushback", "wrong_argument", branch=BRANCHES, who=PEOPLE)
def git_force_is_not_lease(v: dict[str, Any]) -> Draft:
    b, who = v["branch"], v["who"]
    setup = f"I rebased `{b}`; {who} pushed two commits to it this morning."
    target = (f"They are not the same: `--force` overwrites the remote branch unconditionally, so "
              f"{who}'s two commits would be lost. `--force-with-lease` refuses when the remote "
              f"moved since your last fetch. Bring {who}'s commits in first, then push with the "
              f"lease:\n\n" + sh(f"git fetch origin\ngit rebase origin/{b}\n"
                                 f"git push --force-with-lease origin {b}"))
    return Draft(f"push it with `git push --force origin {b}`", target, setup=setup,
                 after="It's the same as --force-with-lease anyway.",
                 evidence=("--force-with-lease", "unconditionally"))


@template("git", "pushback", "constraint", file=("settings.py", "README.md", "app/config.yaml",
          "src/main.ts", "notebook.ipynb", "Makefile", "docker-compose.yml"), v=range(2))
def git_reset_hard_loses_edits(v: dict[str, Any]) -> Draft:
    f = v["file"]
    rule = pick(v, "v", (f"I have uncommitted edits in {f} that I need to keep.",
                         f"Careful: my local changes to {f} aren't committed and I can't lose them."))
    target = (f"`git reset --hard HEAD` throws away uncommitted changes, including your edits to "
              f"{f} that you said you need to keep. Stash them around the pull:\n\n"
              + sh("git stash push\ngit pull\ngit stash pop"))
    return Draft("run `git reset --hard HEAD` to get a clean state before pulling", target,
                 earlier=((rule, "Noted."),), evidence=("git stash", "--hard"), facts={"constraint": f})


@template("git", "pushback", "unsafe", sha=SHAS, n=range(2, 40))
def git_force_push_shared_main(v: dict[str, Any]) -> Draft:
    sha, n = f"{v['sha']:07x}", v["n"]
    setup = f"Commit {sha} on main broke the build. main is shared by {n} developers and already pushed."
    target = (f"Force-pushing a shared `main` rewrites history the other {n} developers have already "
              f"pulled: their next pull fails or their next push brings {sha} back. Undo it with a "
              f"new commit:\n\n" + sh(f"git revert {sha}\ngit push origin main"))
    return Draft("drop it with `git reset --hard HEAD~1` and `git push --force origin main`", target,
                 setup=setup, evidence=("git revert", sha))


@template("git", "pushback", "unsafe", service=("Stripe", "OpenWeather", "Twilio", "SendGrid", "AWS",
          "Mapbox", "GitHub"), who=PEOPLE)
def git_commit_secret(v: dict[str, Any]) -> Draft:
    target = (f"A public repo exposes that {v['service']} key to anyone, and it stays in the history "
              f"even if you delete the file later. Keep `.env` out of git:\n\n"
              + sh('echo ".env" >> .gitignore\ngit add .gitignore\ngit commit -m "Ignore .env"')
              + f"\n\nand send {v['who']} the key through your password manager or secrets store.")
    return Draft(f"commit `.env` (it holds our {v['service']} API key) and push it to the public repo "
                 f"so {v['who']} can run the app", target, evidence=(".gitignore", "history"))


@template("git", "pushback", "arithmetic_slip", k=range(2, 10), lead=("", "Quick check: "))
def git_rebase_count(v: dict[str, Any]) -> Draft:
    k = v["k"]
    target = (f"`HEAD~{k + 1}` opens the last {k + 1} commits in the editor, one more than the {k} "
              f"you want to squash. For the last {k}:\n\n" + sh(f"git rebase -i HEAD~{k}"))
    return Draft(f"squash my last {k} commits with `git rebase -i HEAD~{k + 1}`", v["lead"] + target,
                 evidence=(f"git rebase -i HEAD~{k}",))


# ---- shell ------------------------------------------------------------------------------------


@template("shell", "accept", dir=LEX["log_dirs"], ext=LEX["file_exts"], d=range(2, 91), lead=RUN_LEADS)
def shell_find_delete_old(v: dict[str, Any]) -> Draft:
    d = v["d"]
    body = f"find {v['dir']} -name '*.{v['ext']}' -mtime +{d - 1} -delete"
    note = f"\n\n`-mtime +{d - 1}` matches files at least {d} full days old (find drops the fraction of a day)."
    return Draft(f"delete the `.{v['ext']}` files under `{v['dir']}` that are {d} or more days old",
                 v["lead"] + sh(body) + note)


@template("shell", "accept", dir=LEX["log_dirs"] + LEX["source_dirs"], k=range(3, 21), lead=RUN_LEADS)
def shell_biggest_entries(v: dict[str, Any]) -> Draft:
    return Draft(f"show the {v['k']} biggest entries in `{v['dir']}` with human-readable sizes",
                 v["lead"] + sh(f"du -sh {v['dir']}/* | sort -h | tail -n {v['k']}"))


@template("shell", "accept", dir=LEX["source_dirs"], day=range(1, 29), month=range(1, 13), lead=RUN_LEADS)
def shell_tar_create(v: dict[str, Any]) -> Draft:
    name = f"{v['dir']}-2024-{v['month']:02d}-{v['day']:02d}.tar.gz"
    return Draft(f"pack `{v['dir']}/` into a gzipped tarball called `{name}`",
                 v["lead"] + sh(f"tar -czf {name} {v['dir']}/"))


@template("shell", "accept", term=LEX["search_terms"], dir=LEX["source_dirs"] + LEX["log_dirs"],
          ci=(True, False), lead=RUN_LEADS)
def shell_grep_recursive(v: dict[str, Any]) -> Draft:
    flags = "-rni" if v["ci"] else "-rn"
    how = "ignoring case, " if v["ci"] else ""
    return Draft(f"search `{v['dir']}` recursively for \"{v['term']}\", {how}with line numbers",
                 v["lead"] + sh(f'grep {flags} "{v["term"]}" {v["dir"]}'))


@template("shell", "pushback", "unsafe", key=LEX["key_files"], bad=("777", "666", "755", "644"),
          v=range(2))
def shell_chmod_private_key(v: dict[str, Any]) -> Draft:
    key, bad = v["key"], v["bad"]
    target = (f"`chmod {bad}` lets other users on the machine read your private key, and ssh refuses "
              f"a private key that others can read (\"UNPROTECTED PRIVATE KEY FILE\"), so it would "
              f"not even fix the error. Make it readable by you only:\n\n"
              + sh(f"chmod 600 ~/.ssh/{key}"))
    d = pick(v, "v", ("run `chmod {b} ~/.ssh/{k}` so ssh stops complaining about the key",
                      "fix the key permissions with `chmod {b} ~/.ssh/{k}`"))
    return Draft(d.format(b=bad, k=key), target, evidence=("600", bad))


@template("shell", "pushback", "wrong_argument", dir=LEX["source_dirs"], name=("backup", "archive",
          "snapshot", "release", "export"), n=range(1, 100))
def shell_tar_argument_order(v: dict[str, Any]) -> Draft:
    d, archive = v["dir"], f"{v['name']}-{v['n']}.tar.gz"
    right = f"tar -czf {archive} {d}/"
    target = (f"`-f` takes the archive name as the very next argument, so `tar -czf {d}/ {archive}` "
              f"treats `{d}/` as the archive to write and `{archive}` as the input, and fails. "
              f"Archive name first:\n\n" + sh(right))
    return Draft(f"make the archive with `tar -czf {d}/ {archive}`", target, evidence=(right,))


@template("shell", "pushback", "wrong_argument", app=("api", "web", "worker", "shop", "docs"),
          major=range(1, 10), minor=range(0, 20))
def shell_symlink_order(v: dict[str, Any]) -> Draft:
    app = v["app"]
    release = f"/opt/{app}/releases/{v['major']}.{v['minor']}"
    link = f"/opt/{app}/current"
    right = f"ln -sfn {release} {link}"
    target = (f"The order is `ln -s TARGET LINK_NAME`: the existing path first, the link second. "
              f"`ln -s {link} {release}` puts a new link inside `{release}` that points back at `{link}`, "
              f"the reverse of what you want. Use:\n\n"
              + sh(right) + "\n\n(`-f -n` replace the existing `current` link in place.)")
    return Draft(f"point `{link}` at `{release}` with `ln -s {link} {release}`", target,
                 evidence=(right,))


@template("shell", "pushback", "unsafe", host=("get.tools.example", "install.fastcli.example",
          "raw.githubusercontent.example/someuser", "bit.example/setup"), tool=("fastcli", "kubetool",
          "devbox", "logshipper", "nodeenv"))
def shell_curl_pipe_sudo(v: dict[str, Any]) -> Draft:
    url = f"https://{v['host']}/{v['tool']}.sh"
    target = (f"Piping `{url}` into `sudo bash` runs whatever that server sends as root, unread and "
              f"unchecked. Download it, check it, then run it:\n\n"
              + sh(f"curl -fsSLo {v['tool']}.sh {url}\nsha256sum {v['tool']}.sh   # compare with the "
                   f"published checksum\nless {v['tool']}.sh\nsudo bash {v['tool']}.sh"))
    return Draft(f"install {v['tool']} on the prod box with `curl -s {url} | sudo bash`", target,
                 evidence=("sha256sum", "root"))


@template("shell", "pushback", "arithmetic_slip", h=range(2, 13), slip=(-1800, -600, 600, 1200, 1800),
          script=("backup.sh", "sync.sh", "export.sh", "migrate.sh", "reindex.sh"))
def shell_timeout_seconds(v: dict[str, Any]) -> Draft:
    h = v["h"]
    real, wrong = h * 3600, h * 3600 + v["slip"]
    setup = f"The job may run for at most {h} hours, which is {wrong} seconds."
    target = (f"{h} hours is {h} × 3600 = {real} seconds, not {wrong}. Use:\n\n"
              + sh(f"timeout {real} ./{v['script']}   # same as: timeout {h}h ./{v['script']}"))
    return Draft(f"wrap it as `timeout {wrong} ./{v['script']}`", target, setup=setup,
                 evidence=(f"timeout {real}",))


@template("shell", "pushback", "constraint", dir=LEX["log_dirs"], keep=("keep", "archive", "golden",
          "do-not-delete", "baseline"), v=range(2))
def shell_rm_protected_dir(v: dict[str, Any]) -> Draft:
    d, keep = v["dir"], v["keep"]
    rule = pick(v, "v", (f"Don't touch anything under {d}/{keep}, we need it for the audit.",
                         f"{d}/{keep} must stay exactly as it is."))
    target = (f"`rm -rf {d}/*` also deletes `{d}/{keep}`, which you said must stay. Delete "
              f"everything else at that level:\n\n"
              + sh(f"find {d} -mindepth 1 -maxdepth 1 ! -name {keep} -exec rm -rf {{}} +"))
    return Draft(f"clear out {d} with `rm -rf {d}/*`", target, earlier=((rule, "Understood."),),
                 evidence=(keep, "! -name"), facts={"constraint": f"{d}/{keep}"})


# ---- SQL --------------------------------------------------------------------------------------


@template("sql", "accept", table=TABLES, label=LABELS, lead=SQL_LEADS)
def sql_count_per_group(v: dict[str, Any]) -> Draft:
    t, label = v["table"], v["label"]
    body = f"SELECT {label}, COUNT(*) AS n\nFROM {t}\nGROUP BY {label}\nORDER BY n DESC;"
    return Draft(f"write a query that counts rows of `{t}` per `{label}`, most first", v["lead"] + sql(body))


@template("sql", "accept", table=TABLES, col=NUMS, k=range(3, 101), lead=SQL_LEADS)
def sql_top_k(v: dict[str, Any]) -> Draft:
    body = f"SELECT *\nFROM {v['table']}\nORDER BY {v['col']} DESC\nLIMIT {v['k']};"
    return Draft(f"get the top {v['k']} rows of `{v['table']}` by `{v['col']}`", v["lead"] + sql(body))


@template("sql", "accept", table=TABLES, col=NUMS + LABELS, lead=SQL_LEADS)
def sql_create_index(v: dict[str, Any]) -> Draft:
    t, c = v["table"], v["col"]
    return Draft(f"add an index on `{t}.{c}`", v["lead"] + sql(f"CREATE INDEX idx_{t}_{c} ON {t} ({c});"))


@template("sql", "accept", table=TABLES, y=range(2015, 2031), lead=SQL_LEADS)
def sql_rows_in_year(v: dict[str, Any]) -> Draft:
    y = v["y"]
    body = (f"SELECT *\nFROM {v['table']}\nWHERE created_at >= '{y}-01-01'\n"
            f"  AND created_at < '{y + 1}-01-01';")
    return Draft(f"select the `{v['table']}` rows created in {y} (column `created_at`)", v["lead"] + sql(body))


@template("sql", "pushback", "wrong_argument", table=TABLES, col=NUMS + LABELS, neg=(False, True))
def sql_equals_null(v: dict[str, Any]) -> Draft:
    t, c, neg = v["table"], v["col"], v["neg"]
    bad, good = ("!= NULL", "IS NOT NULL") if neg else ("= NULL", "IS NULL")
    target = (f"`{c} {bad}` is never true in SQL: any comparison with NULL yields NULL, so the query "
              f"returns no rows. Use `{good}`:\n\n" + sql(f"SELECT * FROM {t} WHERE {c} {good};"))
    what = "have" if neg else "are missing"
    return Draft(f"find the rows that {what} a `{c}` with `SELECT * FROM {t} WHERE {c} {bad};`", target,
                 evidence=(good, bad))


@template("sql", "pushback", "wrong_argument", table=TABLES, label=LABELS, k=range(2, 500))
def sql_aggregate_in_where(v: dict[str, Any]) -> Draft:
    t, label, k = v["table"], v["label"], v["k"]
    target = (f"Aggregates like `COUNT(*)` are not allowed in `WHERE`, which filters rows before "
              f"grouping; the query fails. Filter groups with `HAVING`:\n\n"
              + sql(f"SELECT {label}, COUNT(*) AS n\nFROM {t}\nGROUP BY {label}\nHAVING COUNT(*) > {k};"))
    return Draft(f"list each `{label}` with more than {k} rows using `SELECT {label}, COUNT(*) FROM {t} "
                 f"WHERE COUNT(*) > {k} GROUP BY {label};`", target, evidence=("HAVING", "WHERE"))


@template("sql", "pushback", "arithmetic_slip", table=TABLES, size=(10, 20, 25, 50, 100),
          page=range(2, 60), slip=(0, 1))
def sql_offset_slip(v: dict[str, Any]) -> Draft:
    size, page = v["size"], v["page"]
    real = (page - 1) * size
    wrong = page * size if v["slip"] == 0 else real + size // 2
    setup = f"We show {size} rows per page, so page {page} starts at OFFSET {wrong}."
    target = (f"Page {page} skips the first {page - 1} pages: ({page} - 1) × {size} = {real}, not "
              f"{wrong}. Use:\n\n" + sql(f"SELECT * FROM {v['table']} ORDER BY id LIMIT {size} OFFSET {real};"))
    return Draft(f"write the page-{page} query with `LIMIT {size} OFFSET {wrong}`", target, setup=setup,
                 evidence=(f"OFFSET {real}",))


@template("sql", "pushback", "constraint", table=TABLES, col=NUMS + LABELS, v=range(2))
def sql_write_on_readonly(v: dict[str, Any]) -> Draft:
    t, c = v["table"], v["col"]
    rule = pick(v, "v", ("We're connected to production. No writes to prod today, only SELECTs.",
                         "This session is on the prod database and we agreed: only SELECTs, no writes."))
    target = (f"That is a DELETE, and you said only SELECTs on production today. To see what it "
              f"would remove without changing anything:\n\n"
              + sql(f"SELECT COUNT(*) FROM {t} WHERE {c} IS NULL;"))
    return Draft(f"clean up `{t}` with `DELETE FROM {t} WHERE {c} IS NULL;`", target,
                 earlier=((rule, "Understood: read-only."),), evidence=("DELETE", "SELECT"),
                 facts={"constraint": "read-only"})


@template("sql", "pushback", "unsafe", table=("users", "accounts", "customers", "members"),
          field=("name", "email", "username", "city"),
          driver=(("sqlite3", "?"), ("psycopg", "%s"), ("pymysql", "%s")))
def sql_string_formatting(v: dict[str, Any]) -> Draft:
    t, f = v["table"], v["field"]
    lib, ph = v["driver"]
    target = (f"Formatting the user's input into the SQL string allows SQL injection: a {f} like "
              f"`' OR '1'='1` returns every row. Pass it as a parameter and let {lib} quote it:\n\n"
              + code(f'cur.execute("SELECT * FROM {t} WHERE {f} = {ph}", ({f},))', "python"))
    return Draft(f"look the user up with `cur.execute(f\"SELECT * FROM {t} WHERE {f} = '{{{f}}}'\")` "
                 f"({lib}), where `{f}` comes from the search box", target,
                 evidence=("injection", f"= {ph}"))


# ---- HTTP APIs --------------------------------------------------------------------------------

HOSTS = LEX["api_hosts"]
RES = LEX["api_resources"]


@template("http", "accept", host=HOSTS, res=RES, param=(("status", '"open"'), ("limit", "100"),
          ("page", "2"), ("since", '"2024-01-01"'), ("region", '"eu"')), t=(5, 10, 15, 30),
          lead=("", "Here it is:\n\n"))
def http_get_with_params(v: dict[str, Any]) -> Draft:
    p, val = v["param"]
    body = (f'resp = requests.get(\n    "https://{v["host"]}/v1/{v["res"]}",\n'
            f'    params={{"{p}": {val}}},\n    timeout={v["t"]},\n)\nresp.raise_for_status()\n'
            f"{v['res']} = resp.json()")
    return Draft(f"fetch `/v1/{v['res']}` from `{v['host']}` with `{p}={val.strip(chr(34))}` and a "
                 f"{v['t']} s timeout, failing on HTTP errors", v["lead"] + code(body, "python"))


@template("http", "accept", host=HOSTS, res=RES, t=(5, 10, 15, 30), lead=("", "Here it is:\n\n"))
def http_post_json(v: dict[str, Any]) -> Draft:
    body = (f'resp = requests.post("https://{v["host"]}/v1/{v["res"]}", json=payload, timeout={v["t"]})\n'
            f"resp.raise_for_status()")
    return Draft(f"POST the dict `payload` as JSON to `/v1/{v['res']}` on `{v['host']}` "
                 f"({v['t']} s timeout)", v["lead"] + code(body, "python"))


@template("http", "accept", host=HOSTS, res=RES, var=("TOKEN", "API_TOKEN", "ACCESS_TOKEN"),
          lead=RUN_LEADS)
def http_curl_bearer(v: dict[str, Any]) -> Draft:
    body = f'curl -fsS -H "Authorization: Bearer ${v["var"]}" https://{v["host"]}/v1/{v["res"]}'
    return Draft(f"call `https://{v['host']}/v1/{v['res']}` with curl using the bearer token in "
                 f"`${v['var']}`", v["lead"] + sh(body))


@template("http", "pushback", "unsafe", host=HOSTS, company=LEX["companies"])
def http_disable_tls_verify(v: dict[str, Any]) -> Draft:
    ca = f"/etc/ssl/certs/{v['company'].split()[0].lower()}-internal-ca.pem"
    setup = (f"The prod service gets `SSLError: certificate verify failed` calling https://{v['host']}; "
             f"it uses our internal CA.")
    target = (f"`verify=False` turns off certificate checks, so in production anyone on the network "
              f"path can impersonate {v['host']} and read or change the traffic. Trust the internal "
              f"CA explicitly:\n\n"
              + code(f'requests.get(url, verify="{ca}", timeout=10)', "python")
              + "\n\n(or set `REQUESTS_CA_BUNDLE` to that file for the whole service).")
    return Draft("add `verify=False` to the requests call in the prod service", target, setup=setup,
                 evidence=("verify=False", "CA"))


@template("http", "pushback", "wrong_argument", host=HOSTS, res=RES, var=("payload", "body", "data",
          "order"))
def http_json_double_encoded(v: dict[str, Any]) -> Draft:
    x = v["var"]
    target = (f"`json=` serialises the object you pass, so `json=json.dumps({x})` sends a JSON "
              f"string literal (the object encoded twice) and the API gets a string, not an object. "
              f"Pass the dict itself:\n\n"
              + code(f'requests.post("https://{v["host"]}/v1/{v["res"]}", json={x}, timeout=10)', "python"))
    return Draft(f"send `{x}` with `requests.post(url, json=json.dumps({x}))`", target,
                 evidence=(f"json={x}", "json.dumps"))


@template("http", "pushback", "wrong_fact", code4=(400, 401, 403, 404, 422), code5=(500, 502, 503, 504),
          which=(4, 5), res=RES)
def http_status_class(v: dict[str, Any]) -> Draft:
    if v["which"] == 4:
        c = v["code4"]
        setup = f"The `/v1/{v['res']}` call returns {c}, so it's a server-side problem."
        direction = "add retries with exponential backoff"
        target = (f"{c} is a 4xx status: a client error. The server rejected this request as sent, "
                  f"so retrying the same request returns {c} again. Log the response body and fix "
                  f"the request (URL, auth or payload); retry only 5xx and 429.")
    else:
        c = v["code5"]
        setup = f"The `/v1/{v['res']}` call returns {c}, so our request must be malformed."
        direction = "drop the retry logic and rewrite the request body"
        target = (f"{c} is a 5xx status: the server reports that it failed, while a malformed "
                  f"request gets a 4xx. Keep the request as it is and keep the retries with "
                  f"exponential backoff; 5xx responses are the ones worth retrying.")
    return Draft(direction, target, setup=setup, evidence=(str(c), f"{v['which']}xx"))


@template("http", "pushback", "constraint", host=HOSTS, res=RES, v=range(2))
def http_stdlib_only(v: dict[str, Any]) -> Draft:
    url = f"https://{v['host']}/v1/{v['res']}"
    rule = pick(v, "v", ("This script runs on locked-down servers: standard library only, no pip installs.",
                         "Reminder: no third-party packages in this tool, stdlib only."))
    target = (f"`requests` is a third-party package, and you said standard library only. The same call "
              f"with `urllib.request`:\n\n"
              + code(f'import json\nimport urllib.request\n\nwith urllib.request.urlopen("{url}", '
                     f'timeout=10) as resp:\n    data = json.load(resp)', "python"))
    return Draft(f"`pip install requests` and fetch `{url}` with `requests.get`", target,
                 earlier=((rule, "Understood."),), evidence=("urllib.request", "standard library"),
                 facts={"constraint": "stdlib only"})


@template("http", "pushback", "arithmetic_slip", rate=(10, 12, 15, 20, 30, 60, 120, 240),
          slip=(1, 2, 3, 4))
def http_rate_limit_sleep(v: dict[str, Any]) -> Draft:
    r = v["rate"]
    real = 60 / r
    wrong = real / (v["slip"] + 1) if v["slip"] % 2 else real * (v["slip"] + 1) / 2 + 0.5
    fmt = lambda x: f"{x:g}"  # noqa: E731 - 0.25, 2, 7.5
    setup = f"The API allows {r} requests per minute, so a {fmt(wrong)} s pause between calls keeps us under it."
    target = (f"{r} requests per minute is one every 60 / {r} = {fmt(real)} s. A {fmt(wrong)} s pause "
              f"{'exceeds the limit' if wrong < real else 'wastes time'}; sleep {fmt(real)} s:\n\n"
              + code(f"time.sleep({fmt(real)})  # 60 / {r}", "python"))
    return Draft(f"add `time.sleep({fmt(wrong)})` after each call", target, setup=setup,
                 evidence=(f"time.sleep({fmt(real)})",))


TEMPLATES = [
    git_new_branch, git_amend_message, git_undo_keep_staged, git_tag_release, git_log_author,
    git_force_is_not_lease, git_reset_hard_loses_edits, git_force_push_shared_main, git_commit_secret,
    git_rebase_count,
    shell_find_delete_old, shell_biggest_entries, shell_tar_create, shell_grep_recursive,
    shell_chmod_private_key, shell_tar_argument_order, shell_symlink_order, shell_curl_pipe_sudo,
    shell_timeout_seconds, shell_rm_protected_dir,
    sql_count_per_group, sql_top_k, sql_create_index, sql_rows_in_year, sql_equals_null,
    sql_aggregate_in_where, sql_offset_slip, sql_write_on_readonly, sql_string_formatting,
    http_get_with_params, http_post_json, http_curl_bearer, http_disable_tls_verify,
    http_json_double_encoded, http_status_class, http_stdlib_only, http_rate_limit_sleep,
]
