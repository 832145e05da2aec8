"""serve/service.py: the micro-batcher that groups concurrent requests into model calls."""

import asyncio

from routetune.serve.service import Batcher


def test_micro_batches_stay_within_the_token_budget():
    calls = []

    async def scenario():
        from concurrent.futures import ThreadPoolExecutor

        b = Batcher(lambda items: (calls.append(len(items)), items)[1], max_batch=100, max_wait_ms=50,
                    executor=ThreadPoolExecutor(1), observe=lambda n: None, max_tokens=100)
        b.start()
        results = await asyncio.gather(*(b.submit([i] * 2, tokens=60) for i in range(4)))
        await b.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [[i, i] for i in range(4)]
    assert calls == [2, 2, 2, 2]  # 60 + 60 tokens would pass 100: each request gets its own call
