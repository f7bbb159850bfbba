"""Bucket choice: aspect ratio first, then the largest resolution that needs no upscaling, then length."""

from __future__ import annotations

from vdm.data.buckets import Bucket, choose_bucket

BUCKETS = [
    Bucket(16, 256, 256, 8),  # 0: square, large
    Bucket(16, 128, 128, 32),  # 1: square, small
    Bucket(16, 144, 256, 8),  # 2: 16:9
    Bucket(8, 256, 256, 16),  # 3: square, large, short
    Bucket(1, 256, 256, 64),  # 4: images
]


def test_aspect_ratio_decides_first():
    assert choose_bucket(BUCKETS, width=1920, height=1080, available_frames=100, is_image=False) == 2
    assert choose_bucket(BUCKETS, width=1000, height=1000, available_frames=100, is_image=False) == 0


def test_small_sources_go_to_the_resolution_they_do_not_need_upscaling_for():
    assert choose_bucket(BUCKETS, width=160, height=160, available_frames=100, is_image=False) == 1
    assert choose_bucket(BUCKETS, width=300, height=300, available_frames=100, is_image=False) == 0
    # smaller than every square bucket: the one that upscales least
    assert choose_bucket(BUCKETS, width=64, height=64, available_frames=100, is_image=False) == 1


def test_length_and_images():
    assert choose_bucket(BUCKETS, width=512, height=512, available_frames=10, is_image=False) == 3
    assert choose_bucket(BUCKETS, width=512, height=512, available_frames=4, is_image=False) is None
    assert choose_bucket(BUCKETS, width=640, height=480, available_frames=1, is_image=True) == 4
    assert choose_bucket(BUCKETS[:4], width=640, height=480, available_frames=1, is_image=True) is None
