"""Audio front end: decoding, resampling, Kaldi fbank, padding and normalisation."""
import functools

import jax
import jax.numpy as jnp
import kaldi_native_fbank as knf
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from bridle_jax.data import audio

SR = 16000
MEAN, STD = -4.4446096, 3.3216383
# Cells whose log-mel energy is within a few decades of Kaldi's floor (log eps = -15.9)
# come from spectral leakage about 1e-6 below the frame's peak magnitude, where float32
# FFT rounding alone moves the log by ~1e-3 (kaldi-native-fbank vs. float64 too).
# They are checked with the coarse bound; all louder cells with the brief's 1e-3.
AUDIBLE_LOG_MEL = -12.0
FINE_TOL, COARSE_TOL = 1e-3, 5e-3


def _tone(seconds=1.0, freq=1000.0, amplitude=0.5):
  t = np.arange(int(seconds * SR)) / SR
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _noise(seconds=1.0, seed=0):
  return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(
      np.float32)


def _speech_like(seconds=1.0):
  """120 Hz glottal pulse train through three formant resonators, 4 Hz AM."""
  n = int(seconds * SR)
  signal = np.zeros(n)
  signal[::SR // 120] = 1.0
  for center, bandwidth in ((700, 100), (1200, 120), (2600, 200)):
    b, a = scipy.signal.iirpeak(center, center / bandwidth, fs=SR)
    signal = scipy.signal.lfilter(b, a, signal)
  signal *= 1.0 + 0.8 * np.sin(2 * np.pi * 4.0 * np.arange(n) / SR)
  return (0.3 * signal / np.abs(signal).max()).astype(np.float32)


SIGNALS = {"tone": _tone, "noise": _noise, "speech": _speech_like}


def _knf_fbank(waveform, num_bins):
  opts = knf.FbankOptions()
  opts.frame_opts.samp_freq = SR
  opts.frame_opts.dither = 0.0
  opts.frame_opts.snip_edges = True
  opts.frame_opts.window_type = "hanning"
  opts.mel_opts.num_bins = num_bins
  opts.use_energy = False
  opts.use_log_fbank = True
  opts.use_power = True
  computer = knf.OnlineFbank(opts)
  computer.accept_waveform(SR, waveform.tolist())
  computer.input_finished()
  return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])


def _float64_fbank(waveform, num_bins):
  """Kaldi fbank straight from its definition, in float64 NumPy."""
  x = np.asarray(waveform, np.float64)
  frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160]
  frames = frames - frames.mean(axis=1, keepdims=True)
  frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = frames * np.hanning(400)  # numpy's hanning is Kaldi's symmetric window
  power = np.abs(np.fft.rfft(frames, 512)) ** 2
  mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
  edges = np.linspace(mel(20.0), mel(8000.0), num_bins + 2)
  fft_mel = mel(np.arange(256) * SR / 512)[:, None]
  up = (fft_mel - edges[:-2]) / (edges[1:-1] - edges[:-2])
  down = (edges[2:] - fft_mel) / (edges[2:] - edges[1:-1])
  weights = np.clip(np.minimum(up, down), 0.0, None)
  energies = power[:, :256] @ weights
  return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def _assert_log_mel_close(ours, reference):
  assert ours.shape == reference.shape
  audible = reference > AUDIBLE_LOG_MEL
  assert audible.mean() > 0.1
  np.testing.assert_array_less(np.abs(ours - reference)[audible], FINE_TOL)
  np.testing.assert_array_less(np.abs(ours - reference), COARSE_TOL)


# ---- frame arithmetic ---------------------------------------------------------------


def test_frame_arithmetic():
  assert (audio.FRAME_LENGTH, audio.FRAME_SHIFT) == (400, 160)
  assert audio.num_frames(10 * SR) == 998
  assert [audio.num_frames(n) for n in (0, 399, 400, 559, 560)] == [0, 0, 1, 1, 2]
  for frames in (1, 2, 98, 1024):
    samples = audio.num_samples_for_frames(frames)
    assert audio.num_frames(samples) == frames
    assert audio.num_frames(samples - 1) == frames - 1
  assert audio.num_samples_for_frames(1024) == 164_080


def test_ten_second_clip_has_998_frames():
  assert audio.fbank(_noise(10.0)).shape == (998, 128)


# ---- fbank accuracy -----------------------------------------------------------------


@pytest.mark.parametrize("num_bins", [80, 120])
def test_mel_banks_match_kaldi_native_fbank(num_bins):
  opts = knf.MelBanksOptions()
  opts.num_bins = num_bins
  banks = knf.MelBanks(opts, knf.FrameExtractionOptions())
  expected = np.stack([banks.compute(row) for row in np.eye(257, dtype=np.float32)])
  ours = audio.mel_banks(num_bins)
  assert ours.shape == (257, num_bins)
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_mel_banks_at_128_bins_keep_empty_triangles_and_zero_nyquist():
  banks = audio.mel_banks(128)
  assert banks.shape == (257, 128)
  assert np.all(banks[-1] == 0.0)
  assert banks.min() >= 0.0 and banks.max() <= 1.0
  assert (banks.sum(axis=0) == 0.0).any()  # narrow low triangles catch no FFT bin


@pytest.mark.parametrize("signal", sorted(SIGNALS))
@pytest.mark.parametrize("num_bins", [80, 120])
def test_fbank_matches_kaldi_native_fbank(signal, num_bins):
  waveform = SIGNALS[signal]()
  ours = np.asarray(audio.fbank(waveform, SR, num_bins))
  _assert_log_mel_close(ours, _knf_fbank(waveform, num_bins))


@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_fbank_matches_float64_kaldi_formulas_at_128_bins(signal):
  waveform = SIGNALS[signal]()
  ours = np.asarray(audio.fbank(waveform))
  _assert_log_mel_close(ours, _float64_fbank(waveform, 128))


def test_fbank_jit_batch_and_dtype():
  waves = np.stack([_tone(0.5), _noise(0.5), _speech_like(0.5)])
  host = np.asarray(audio.fbank(waves))
  jitted = jax.jit(audio.fbank, static_argnames=("sample_rate", "num_mel_bins"))
  np.testing.assert_allclose(np.asarray(jitted(waves)), host, atol=1e-5)
  for wave, row in zip(waves, host):
    np.testing.assert_allclose(np.asarray(audio.fbank(wave)), row, atol=1e-5)
  nested = audio.fbank(np.stack([waves, waves]))
  assert nested.shape == (2, 3, 48, 128) and nested.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(nested[1]), host, atol=1e-5)
  assert audio.fbank(waves[0].astype(np.float64)).dtype == jnp.float32
  assert audio.fbank(jnp.asarray(waves[0], jnp.bfloat16)).dtype == jnp.float32


def test_fbank_op_by_op_agrees_with_compiled():
  waves = np.stack([_tone(0.5), _speech_like(0.5)])
  compiled = np.asarray(audio.fbank(waves))
  with jax.disable_jit():
    op_by_op = np.asarray(audio.fbank(waves))
  loud = compiled > -4.0  # rounding order only matters relative to the frame's peak
  assert loud.mean() > 0.1
  np.testing.assert_allclose(op_by_op[loud], compiled[loud], atol=1e-5)
  np.testing.assert_allclose(op_by_op, compiled, atol=FINE_TOL)


# ---- decoding and resampling --------------------------------------------------------


@pytest.mark.parametrize("file_rate", [44100, 8000])
def test_resampling_keeps_tone_frequency_and_duration(tmp_path, file_rate):
  t = np.arange(file_rate // 2) / file_rate  # 0.5 s
  path = tmp_path / f"tone_{file_rate}.wav"
  sf.write(path, 0.5 * np.sin(2 * np.pi * 1000.0 * t), file_rate, subtype="PCM_16")
  waveform = audio.load_audio(path)
  assert waveform.dtype == np.float32 and waveform.shape == (SR // 2,)
  spectrum = np.abs(np.fft.rfft(waveform))
  peak_hz = spectrum.argmax() * SR / waveform.shape[0]
  assert abs(peak_hz - 1000.0) <= SR / waveform.shape[0]
  assert 0.3 < np.abs(waveform).max() < 0.55


def test_downsampling_removes_content_above_nyquist(tmp_path):
  file_rate = 44100
  t = np.arange(file_rate // 2) / file_rate
  both = 0.4 * np.sin(2 * np.pi * 1000.0 * t) + 0.4 * np.sin(2 * np.pi * 11000.0 * t)
  path = tmp_path / "tones.wav"
  sf.write(path, both, file_rate, subtype="FLOAT")
  spectrum = np.abs(np.fft.rfft(audio.load_audio(path) * np.hanning(SR // 2)))
  hz = np.fft.rfftfreq(SR // 2, 1 / SR)
  alias = spectrum[np.abs(hz - 5000.0) < 50].max()  # 11 kHz folds to 5 kHz
  assert alias < 1e-4 * spectrum[np.abs(hz - 1000.0) < 50].max()


@pytest.mark.parametrize("fmt,subtype,tol", [
    ("WAV", "PCM_16", 1e-4), ("WAV", "PCM_24", 1e-6), ("WAV", "FLOAT", 1e-7),
    ("WAV", "PCM_U8", 1e-2), ("FLAC", "PCM_16", 1e-4)])
def test_decodes_formats_to_unit_range(tmp_path, fmt, subtype, tol):
  original = _speech_like(0.25) + 0.1
  path = tmp_path / f"clip.{fmt.lower()}"
  sf.write(path, original, SR, format=fmt, subtype=subtype)
  waveform = audio.load_audio(path)
  assert waveform.dtype == np.float32
  np.testing.assert_allclose(waveform, original - original.mean(), atol=tol)
  assert abs(float(waveform.mean())) < 1e-6


def test_stereo_is_averaged_and_bytes_match_path(tmp_path):
  left, right = _tone(0.25, 440.0), _noise(0.25) + 0.2
  path = tmp_path / "stereo.wav"
  sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
  from_path = audio.load_audio(str(path))
  mono = (left + right) / 2
  np.testing.assert_allclose(from_path, mono - mono.mean(), atol=1e-6)
  np.testing.assert_array_equal(audio.load_audio(path.read_bytes(), name="x"), from_path)


def _write_nan_wav(path):
  sf.write(path, np.array([0.1, np.nan, -0.1] * 200, np.float32), SR, subtype="FLOAT")


@pytest.mark.parametrize("case,make", [
    ("missing", lambda p: None),
    ("empty", lambda p: p.write_bytes(b"")),
    ("not_audio", lambda p: p.write_bytes(b"definitely not a RIFF header " * 20)),
    ("no_samples", lambda p: sf.write(p, np.zeros(0, np.float32), SR)),
    ("nan", _write_nan_wav),
    ("too_short_to_resample", lambda p: sf.write(p, np.ones(1, np.float32), 44100))])
def test_bad_files_raise_decode_error_naming_the_file(tmp_path, case, make):
  path = tmp_path / f"{case}.wav"
  make(path)
  with pytest.raises(audio.AudioDecodeError, match=str(path)):
    audio.load_audio(path)
  if path.exists():
    with pytest.raises(audio.AudioDecodeError, match="shard-7/clip.wav"):
      audio.load_audio(path.read_bytes(), name="shard-7/clip.wav")
    with pytest.raises(audio.AudioDecodeError, match="<bytes>"):
      audio.load_audio(path.read_bytes())


# ---- pad / crop and the device front end --------------------------------------------


def test_pad_or_crop_lengths_and_valid_frames():
  short, valid = audio.pad_or_crop(np.ones(5000, np.float32), 64)
  assert short.shape == (audio.num_samples_for_frames(64),) and short.dtype == np.float32
  assert valid == audio.num_frames(5000) == 29
  assert np.all(short[:5000] == 1.0) and np.all(short[5000:] == 0.0)
  ramp = np.arange(20000, dtype=np.float32)
  long, valid = audio.pad_or_crop(ramp, 64)
  assert valid == 64
  np.testing.assert_array_equal(long, ramp[:audio.num_samples_for_frames(64)])
  tiny, valid = audio.pad_or_crop(np.ones(100, np.float32), 8)
  assert valid == 0 and tiny.shape == (audio.num_samples_for_frames(8),)


def _features_fn(target_length, **kwargs):
  return jax.jit(functools.partial(
      audio.features, num_mel_bins=128, target_length=target_length, mean=MEAN, std=STD,
      **kwargs))


def test_features_pad_like_the_reference():
  target = 64
  clips = [_speech_like(0.3), _noise(0.45, seed=3)]  # 28 and 43 frames
  padded, valid = zip(*(audio.pad_or_crop(c, target) for c in clips))
  out = np.asarray(_features_fn(target)(np.stack(padded), np.array(valid)))
  assert out.shape == (2, target, 128) and out.dtype == np.float32
  for clip, row in zip(clips, out):
    clip_fbank = np.asarray(audio.fbank(clip))
    # Reference: zero-pad the fbank to the target length, then normalise.
    reference = np.zeros((target, 128), np.float32)
    reference[:clip_fbank.shape[0]] = clip_fbank
    reference = (reference - MEAN) / (2 * STD)
    np.testing.assert_allclose(row, reference, atol=1e-5)
    np.testing.assert_allclose(row[clip_fbank.shape[0]:], -MEAN / (2 * STD), rtol=1e-6)


def test_features_crop_keeps_first_frames():
  target = 32
  clip = _speech_like(1.0)
  waveform, valid = audio.pad_or_crop(clip, target)
  out = np.asarray(_features_fn(target)(waveform[None], np.array([valid])))[0]
  expected = audio.normalize(np.asarray(audio.fbank(clip))[:target], MEAN, STD)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_features_rejects_wrong_waveform_length():
  with pytest.raises(ValueError, match="target_length=32"):
    audio.features(np.zeros((1, 1000), np.float32), np.array([1]), num_mel_bins=128,
                   target_length=32, mean=MEAN, std=STD)
