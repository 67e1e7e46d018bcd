#!/usr/bin/env bash
# Reproduce tools/llamacpp/text.txt: Jane Austen, "Persuasion" (1818), public domain.
# Source: Debian 12 (bookworm) package r-cran-janeaustenr 1.0.0-1 (arch all), which ships
# the CRAN package janeaustenr 1.0.0 (Julia Silge); its `persuasion` data object is the
# Project Gutenberg text with the Gutenberg header/footer already removed (one R string per line).
# This script: apt-get download -> verify sha256 -> dpkg-deb -x -> read the R lazy-load
# database data/Rdata.{rdx,rdb} with a tiny stdlib-only Python reader of R's XDR
# serialization -> join the character vector with "\n", add a final "\n". No other edits.
# Usage: tools/llamacpp/fetch_text.sh [OUT]   (default: text.txt next to this script)
# Needs: apt-get (after `apt-get update`), dpkg-deb, python3 (stdlib only), sha256sum.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/text.txt}"
DEB_SHA256=df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95
TXT_SHA256=8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
apt-get download r-cran-janeaustenr=1.0.0-1 >/dev/null 2>&1 || { echo "apt-get download failed (run apt-get update?)" >&2; exit 1; }
echo "$DEB_SHA256  r-cran-janeaustenr_1.0.0-1_all.deb" | sha256sum -c --quiet -
dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb x
python3 - x/usr/lib/R/site-library/janeaustenr/data persuasion "$TMP/out.txt" <<'PY'
import gzip, zlib, bz2, lzma, struct, sys
class R:
    """Minimal reader for R XDR serialization (enough for lazy-load index + character vectors)."""
    def __init__(s, b): s.b, s.p, s.refs = b, 0, []
    def i(s):
        v = struct.unpack('>i', s.b[s.p:s.p+4])[0]; s.p += 4; return v
    def item(s):
        f = s.i(); t = f & 0xFF; attr = f & 0x200; tag = f & 0x400
        if t == 254: return None                       # NILVALUE_SXP
        if t == 255:                                   # REFSXP
            idx = f >> 8
            return s.refs[(idx or s.i()) - 1]
        if t == 1:                                     # SYMSXP
            v = ('SYM', s.item()); s.refs.append(v); return v
        if t == 9:                                     # CHARSXP
            n = s.i()
            if n == -1: return None
            v = s.b[s.p:s.p+n].decode('utf-8'); s.p += n; return v
        if t == 2:                                     # LISTSXP (pairlist)
            if attr: s.item()
            g = s.item() if tag else None
            car = s.item(); cdr = s.item()
            return [(g, car)] + (cdr or [])
        if t in (10, 13, 14, 16, 19):                  # LGL, INT, REAL, STR, VEC
            n = s.i()
            if t in (16, 19): v = [s.item() for _ in range(n)]
            elif t in (10, 13): v = list(struct.unpack('>%di' % n, s.b[s.p:s.p+4*n])); s.p += 4*n
            else: v = list(struct.unpack('>%dd' % n, s.b[s.p:s.p+8*n])); s.p += 8*n
            a = s.item() if attr else None
            for g, val in (a or []):
                if g and g[1] == 'names': return dict(zip(val, v))
            return v
        raise ValueError('unsupported SEXP type %d' % t)
    def top(s):
        assert s.b[:2] == b'X\n', 'not XDR'
        s.p = 2; ver = s.i(); s.i(); s.i()
        if ver == 3: n = s.i(); s.p += n               # native encoding name
        return s.item()
d, name, out = sys.argv[1:4]
idx = R(gzip.decompress(open(d + '/Rdata.rdx', 'rb').read())).top()
off, ln = idx['variables'][name]
blob = open(d + '/Rdata.rdb', 'rb').read()[off:off+ln]
c = blob[4:5]
raw = lzma.decompress(blob[5:]) if c == b'Z' else bz2.decompress(blob[5:]) if c == b'2' else zlib.decompress(blob[4:])
lines = R(raw).top()
assert all(isinstance(x, str) for x in lines)
text = '\n'.join(lines) + '\n'
assert 'gutenberg' not in text.lower()
open(out, 'w', encoding='utf-8', newline='\n').write(text)
PY
if [ "$TXT_SHA256" != "__TXT_SHA256__" ]; then
  echo "$TXT_SHA256  $TMP/out.txt" | sha256sum -c --quiet -
fi
cp "$TMP/out.txt" "$OUT"
echo "wrote $OUT ($(wc -c < "$OUT") bytes, sha256 $(sha256sum "$OUT" | cut -d' ' -f1))"
