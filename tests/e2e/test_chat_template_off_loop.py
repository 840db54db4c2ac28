"""Rendering a chat template does not hold the router's other clients.

The checkpoint's own template (trusted: the operator ships it) can be slow to render for
long conversations, and the rendered text is then tokenized; both ran on the router's event loop,
where every other request waited for them. Here a checkpoint whose template takes about a
second and a half to render: a concurrent /v1/models answers in a fraction of that. Real router
process; the checkpoint's weights are random, and no worker is needed (the request is answered 503
once its prompt is built).
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import httpx

from splitserve.testing.cluster import Cluster

# About 20M empty Jinja loop turns (~1.5 s here), then the last message's text.
SLOW_TEMPLATE = "{% for i in range(20000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}{{ messages[-1]['content'] }}"


def test_a_slow_chat_template_does_not_stall_other_requests(e2e_model_dir, tmp_path):
    model_dir = tmp_path / "slow-template"
    shutil.copytree(e2e_model_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = SLOW_TEMPLATE
    config_path.write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)  # newer transformers keep it apart

    cluster = Cluster(model_dir)
    try:
        url = cluster.router.http_url
        with httpx.Client(timeout=60) as client:
            client.get(f"{url}/models").raise_for_status()
            rendered_in: list[float] = []

            def chat() -> None:
                start = time.perf_counter()
                r = client.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
                rendered_in.append(time.perf_counter() - start)
                assert r.status_code in (200, 503), r.text  # 503: no worker; the prompt was built first

            slow = threading.Thread(target=chat)
            slow.start()
            time.sleep(0.3)  # the chat request is rendering by now
            latencies = []
            while slow.is_alive():
                start = time.perf_counter()
                client.get(f"{url}/models").raise_for_status()
                latencies.append(time.perf_counter() - start)
                time.sleep(0.05)
            slow.join()
        assert rendered_in[0] > 1.0, rendered_in  # the template really was slow
        assert latencies and max(latencies) < 0.5 * rendered_in[0], (latencies, rendered_in)
    finally:
        cluster.stop()
