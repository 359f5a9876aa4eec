#!/usr/bin/env bash
# Regenerates the audio fixtures used by media-core's tests (denoise, VAD).
#
# Needs espeak-ng and sox. Everything is 48 kHz, mono, 16-bit PCM WAV.
#
#   speech.wav      utterances from two espeak-ng voices separated by known silences
#   speech.labels   one "start_s end_s" line per utterance (speech segments), the
#                   ground truth for VAD accuracy
#   noise-white.wav, noise-pink.wav   sox noise generators (repeatable seed)
#   noise-babble.wav                  four other espeak-ng voices talking at once
#   mixes/speech-<noise>-<snr>db.wav  speech + looped noise at 0, 5, 10 dB SNR, for
#                   listening (tests mix in code with the same definition so that the
#                   committed fixtures stay small; mixes/ is git-ignored)
#
# SNR is speech *active* power (only inside labelled segments) over noise power.
#
# White and pink noise clips are short on purpose (the tests loop them) to keep the
# repository small; rerun this script with NOISE_SECONDS=5 for longer ones. Babble is
# BABBLE_SECONDS (3) long, see below.
set -euo pipefail

OUT=${1:-$(cd "$(dirname "$0")/.." && pwd)/fixtures}
NOISE_SECONDS=${NOISE_SECONDS:-0.5}
BABBLE_SECONDS=${BABBLE_SECONDS:-3}
# SET=heldout makes a second set from other voices and sentences (not committed):
# the tests report figures on it too, because the VAD and the gates were tuned on
# the main set.
SET=${SET:-main}
mkdir -p "$OUT/mixes"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

for tool in espeak-ng sox; do
  command -v "$tool" >/dev/null || { echo "make-fixtures: $tool is required" >&2; exit 1; }
done

# --- one utterance: espeak-ng -> 48 kHz mono 16-bit, leading/trailing silence trimmed
# so that the label boundaries are the speech boundaries.
say() { # voice text out.wav
  espeak-ng -v "$1" -s 185 -w "$TMP/raw.wav" "$2"
  sox -R "$TMP/raw.wav" -r 48000 -c 1 -b 16 "$3" \
    silence 1 0.005 0.5% reverse silence 1 0.005 0.5% reverse norm -6
}
silence() { # seconds out.wav
  sox -R -n -r 48000 -c 1 -b 16 "$2" trim 0 "$1"
}
dur() { soxi -D "$1"; }

if [ "$SET" = heldout ]; then
  say en-gb-scotland "Where did you put the keys"   "$TMP/u1.wav"
  say en+f5          "Send it over after lunch"     "$TMP/u2.wav"
  say en-us+m7       "That sounds good to me"       "$TMP/u3.wav"
else
  say en-us      "Turn it down please"     "$TMP/u1.wav"
  say en+f3      "Meeting at noon"      "$TMP/u2.wav"
  say en-gb      "Can you hear me now"             "$TMP/u3.wav"
fi

# Silences of different lengths: the VAD must end speech in the long ones and the
# hangover must not swallow the short one entirely.
GAPS=(0.30 0.50 0.30 0.35)
parts=()
labels=""
t=0
i=0
for u in u1 u2 u3; do
  silence "${GAPS[$i]}" "$TMP/s$i.wav"
  parts+=("$TMP/s$i.wav" "$TMP/$u.wav")
  t=$(echo "$t + ${GAPS[$i]}" | bc -l)
  d=$(dur "$TMP/$u.wav")
  labels+=$(printf "%.4f %.4f\n" "$t" "$(echo "$t + $d" | bc -l)")$'\n'
  t=$(echo "$t + $d" | bc -l)
  i=$((i + 1))
done
silence "${GAPS[$i]}" "$TMP/s$i.wav"
parts+=("$TMP/s$i.wav")
sox -R "${parts[@]}" -b 16 "$OUT/speech.wav"
printf "%s" "$labels" > "$OUT/speech.labels"

# --- noises. -R makes sox's generators repeatable.
sox -R -n -r 48000 -c 1 -b 16 "$OUT/noise-white.wav" synth "$NOISE_SECONDS" whitenoise vol 0.3
sox -R -n -r 48000 -c 1 -b 16 "$OUT/noise-pink.wav" synth "$NOISE_SECONDS" pinknoise vol 0.3
# Babble: four voices that are not in speech.wav, each saying two sentences (so that
# every voice is still talking at the end of the clip), offset starts. It is longer
# than the other noises: a short babble loop repeats the same few syllables, which
# makes its level pattern periodic and flatters any level-based decision.
if [ "$SET" = heldout ]; then
  say en-gb-x-rp+m2 "Has the parcel arrived yet. I ordered it two weeks ago and nothing came." "$TMP/b1.wav"
  say en-us+f1      "Could you open the window please. It is very warm in here this afternoon." "$TMP/b2.wav"
  say en-029        "We are playing football on Sunday. Bring your boots and some water." "$TMP/b3.wav"
  say en+f3         "My sister moved to a new flat. It has a balcony and a small garden." "$TMP/b4.wav"
else
  say en-us+m3   "Did anyone bring the report from yesterday. We still need the numbers for the second quarter." "$TMP/b1.wav"
  say en+f2      "I think we should order lunch for everybody. Pizza is fine unless somebody objects." "$TMP/b2.wav"
  say en-gb+m5   "The train was late again this morning. I waited on the platform for twenty minutes." "$TMP/b3.wav"
  say en+f4      "Let us move the review to next week. The designs are not ready and Sam is away." "$TMP/b4.wav"
fi
sox -R "$TMP/b2.wav" "$TMP/b2d.wav" trim 0.3
sox -R "$TMP/b3.wav" "$TMP/b3d.wav" trim 0.6
sox -R "$TMP/b4.wav" "$TMP/b4d.wav" trim 0.9
sox -R -m "$TMP/b1.wav" "$TMP/b2d.wav" "$TMP/b3d.wav" "$TMP/b4d.wav" -b 16 "$TMP/babble.wav" \
  trim 0.2 "$BABBLE_SECONDS" norm -10
cp "$TMP/babble.wav" "$OUT/noise-babble.wav"

# --- mixes at 0/5/10 dB SNR (for listening; see header).
# Active speech RMS: concatenate the labelled utterances only.
sox -R "$TMP/u1.wav" "$TMP/u2.wav" "$TMP/u3.wav" "$TMP/active.wav"
rms() { sox -R "$1" -n stat 2>&1 | awk '/RMS +amplitude/ {print $3}'; }
speech_rms=$(rms "$TMP/active.wav")
total=$(dur "$OUT/speech.wav")
for noise in white pink babble; do
  reps=$(echo "($total / $(dur "$OUT/noise-$noise.wav")) + 1" | bc)
  sox -R "$OUT/noise-$noise.wav" "$TMP/looped.wav" repeat "$reps" trim 0 "$total"
  noise_rms=$(rms "$TMP/looped.wav")
  for snr in 0 5 10; do
    gain=$(echo "$speech_rms / $noise_rms / e(l(10) * $snr / 20)" | bc -l)
    sox -R -m -v 1 "$OUT/speech.wav" -v "$gain" "$TMP/looped.wav" -b 16 \
      "$OUT/mixes/speech-$noise-${snr}db.wav"
  done
done
printf 'mixes/\n' > "$OUT/.gitignore"
echo "fixtures written to $OUT"
