"""`hyperrec demo`: the whole product on its embedded defaults, in one command.

Generates synthetic interactions with a planted context effect, trains the
embeddings and the context-aware ranker, publishes a bundle into the model
repository, loads the trained users' profiles into the in-process store (or
Redis when configured) and serves on the configured port until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace
from pathlib import Path

from hyperrec.app.config import ServerConfig
from hyperrec.core.bundle import list_versions
from hyperrec.profiles.snapshot import save_profiles, snapshot_user_ids

log = logging.getLogger(__name__)

DEMO_DATA = Path("demo-data")


def profiles_path(config: ServerConfig, version: int) -> Path:
    return DEMO_DATA / f"{config.model_name}-v{version}-profiles.npz"


def train_demo_model(config: ServerConfig, users: int | None = None, items: int | None = None) -> int:
    """Generate data, train and publish a new version; returns its number. Sizes default to SyntheticConfig's."""
    from hyperrec.training.synthetic import SyntheticConfig, generate
    from hyperrec.training.train import TrainConfig, train_and_publish

    started = time.perf_counter()
    sizes = {name: value for name, value in (("n_users", users), ("n_items", items)) if value is not None}
    data = generate(SyntheticConfig(**sizes))
    result = train_and_publish(data, config.model_repo, config.model_name, TrainConfig())
    version = int(result.version_dir.name)
    DEMO_DATA.mkdir(exist_ok=True)
    save_profiles(profiles_path(config, version), result.profiles)
    log.info("trained and published %s in %.1f s", result.version_dir, time.perf_counter() - started)
    return version


def example_calls(port: int, user: str, admin_token: str | None) -> str:
    target = f"localhost:{port}"
    lines = [
        "hyperrec demo is serving. Try, in another terminal (after `source .venv/bin/activate`):",
        f"  hyperrec recommend --target {target} --user {user} --k 10 --device mobile --hour 22",
        f"  hyperrec recommend --target {target} --user {user} --k 10 --device desktop --hour 10",
        f"  hyperrec recommend --target {target} --user someone-new --k 5   # cold start",
        f"  hyperrec events send --target {target} --user someone-new --item <an item above> --type purchase",
        f"  hyperrec recommend --target {target} --user someone-new --k 5   # personalized now",
    ]
    if admin_token is not None:
        lines += [
            f"  export HYPERREC_ADMIN_TOKEN={admin_token}   # this demo's admin token (made for this run)",
            f"  hyperrec models list --target {target}",
        ]
    lines.append("New versions published into the repository are served as they appear; Ctrl-C stops the server.")
    return "\n".join(lines)


async def run_demo(
    config: ServerConfig, retrain: bool = False, users: int | None = None, items: int | None = None
) -> int:
    from hyperrec.app.lifecycle import serve

    versions = list_versions(config.model_repo, config.model_name)
    usable = [v for v in versions if profiles_path(config, v).exists()]
    if retrain or not usable:
        version = await asyncio.to_thread(train_demo_model, config, users, items)
    else:
        version = usable[-1]
        log.info(
            "reusing %s/%s version %d (pass --retrain for a new one)", config.model_repo, config.model_name, version
        )
    # The newest version serves and later ones are followed (the watcher), unless --model-version pins one; the
    # admin API gets a token made for this run when none is configured, so `hyperrec models` works against it.
    admin_token = config.admin_token or secrets.token_urlsafe(24)
    config = replace(config, admin_token=admin_token, seed_profiles=profiles_path(config, version))
    first_user = snapshot_user_ids(profiles_path(config, version))[0]
    await serve(config, on_ready=lambda port: print(example_calls(port, first_user, admin_token), flush=True))
    return 0
