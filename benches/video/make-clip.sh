#!/usr/bin/env bash
# Encodes the load generator's camera clip: ffmpeg's testsrc2 pattern as VP8 (libvpx) in
# three simulcast layers, one IVF file each, the way a browser's camera encoder would send
# them (realtime, no alt-ref frames, which a real-time sender never emits). Keyframes at
# frame 0 and every 15 frames, so a publisher can loop the clip (frame 0 is a keyframe)
# and answer a keyframe request by jumping to the next keyframe (as an encoder would make
# one on request). 1 s at 30 fps keeps the three files small enough to commit.
#   bash benches/video/make-clip.sh [out-dir]   (default: benches/video; needs ffmpeg with libvpx)
set -euo pipefail
OUT="${1:-$(dirname "$0")}"
command -v ffmpeg >/dev/null || { echo "make-clip: needs ffmpeg (apt-get install -y ffmpeg)" >&2; exit 2; }
encode() { # name width height bitrate-kbps
  local name=$1 w=$2 h=$3 kbps=$4
  # -g/-keyint_min 15 and forced keyframes pin the keyframe positions; the rate
  # control is CBR-like (min = max = target) so the layers have the bitrates a
  # simulcast camera of ~150/500/1500 kb/s would send; -error-resilient as WebRTC
  # encoders run it.
  ffmpeg -hide_banner -loglevel error -y \
    -f lavfi -i "testsrc2=size=1280x720:rate=30" -t 1 \
    -vf "scale=${w}:${h}" -pix_fmt yuv420p \
    -c:v libvpx -deadline realtime -cpu-used 8 -lag-in-frames 0 -auto-alt-ref 0 \
    -error-resilient 1 -g 15 -keyint_min 15 -force_key_frames 'expr:eq(mod(n,15),0)' \
    -b:v "${kbps}k" -minrate "${kbps}k" -maxrate "${kbps}k" -bufsize "$((kbps / 2))k" \
    -f ivf "$OUT/$name.ivf"
}
encode q 320 180 150
encode h 640 360 500
encode f 1280 720 1500
ls -l "$OUT"/q.ivf "$OUT"/h.ivf "$OUT"/f.ivf
