"""Publish a few comments from a plain script: ``python -m examples.worker_with_pool.publish``.

``rabbitkeys.publish`` is sync: it uses the process's default publisher, made on first use
and closed (after its pending messages) when the script exits.
"""

import sys

import rabbitkeys

from .app import Comment


def main(posts: list[str], count: int) -> None:
    for n in range(1, count + 1):
        for post in posts:
            rabbitkeys.publish(post, Comment(post=post, text=f"comment {n}"), job_type="comments")
    print(f"published {count} comments for each of {len(posts)} posts")


if __name__ == "__main__":
    # python -m examples.worker_with_pool.publish [COUNT [POST...]]
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    main(sys.argv[2:] or ["post A", "post B"], count)
