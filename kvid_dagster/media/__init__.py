"""Where videos are kept and what is known of them: storage (local or fsspec), probing,
previews, and the quality checks; ``KvidVideo`` is the record handed downstream."""
