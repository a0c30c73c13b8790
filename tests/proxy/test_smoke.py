from __future__ import annotations

from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import ProxyServer


async def test_plain_answer(proxy: ProxyServer, fake: FakeUpstream) -> None:
    fake.push("Thinking hard.</think>Hello there!<｜end▁of▁sentence｜>")
    client = proxy.client()
    resp = await client.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}])
    print(resp)
    assert resp.choices[0].message.content == "Hello there!"
