#!/usr/bin/env python3
"""Embeds a file in the binary: writes a C file defining
`const unsigned char NAME[]` (NUL-terminated) and `const size_t NAME_len`."""
import sys

src, dst, name = sys.argv[1:4]
data = open(src, "rb").read()
with open(dst, "w") as f:
    f.write(f"/* Generated from {src.rsplit('/', 1)[-1]} by embed.py; do not edit. */\n")
    f.write("#include <stddef.h>\n\n")
    f.write(f"const unsigned char {name}[] = {{\n")
    for i in range(0, len(data), 16):
        f.write("    " + ", ".join(str(b) for b in data[i:i + 16]) + ",\n")
    f.write("    0\n};\n")
    f.write(f"const size_t {name}_len = {len(data)};\n")
