// rd_sample: generate images from an exported robust_diffusion denoiser with LibTorch only (no Python).
//
//   rd_sample --model out/model.torchscript.pt --schedule out/model.schedule.txt --out samples \
//             [--num-samples 16] [--steps 50] [--sampler ddim|ddpm|euler|heun] [--eta 0] [--seed 0]
//             [--device cpu|cuda] [--batch-size N] [--no-clip] [--format png|netpbm]
//             [--class C[,C...]] [--guidance-scale W]
//
// Inputs, both written by robust_diffusion.training.export.export_model:
//   * the TorchScript model, called as model(x_t [B,C,H,W] float32, t [B] int64) -> prediction, a class-conditional
//     one as model(x_t, t, class_labels [B] int64);
//   * the schedule file: "# key value" header lines (format, prediction_type, num_train_timesteps,
//     image_shape C H W), then alphas_cumprod of every training step, one float64 per line. Storing
//     alphas_cumprod (rather than, say, the linear schedule's beta range) lets any schedule reach this sampler.
//     A flow-matching model's file says "process flow" and gives "shift" instead of values: the model then takes
//     the float time t * num_train_timesteps and predicts the velocity eps - x0. A class-conditional model's header
//     has "num_classes K" and "null_label K": labels 0..K-1 are its classes, K the unconditional prediction.
//
// Class conditioning: a conditional model needs --class, an unconditional one refuses it. Sampling a conditional
// model without --class is an error rather than a silent fall back to the null label, since unguided
// unconditional samples are rarely what was meant; --class K (the null label) asks for them explicitly.
// --class 3 gives every sample class 3; a list (comma-separated and/or --class repeated) is cycled, sample i
// getting the (i mod n)-th entry, so --class 0,1,2 --num-samples 9 gives three of each. --guidance-scale W is
// classifier-free guidance as sampling.guided_output: out = out_null + W (out_class - out_null), both predictions
// from one call of 2B (the classes, then the null label), as the Python samplers; W = 1 (default) is one call of B
// with the classes alone.
//
// The sampler mirrors python/robust_diffusion/sampling.py step by step, with the schedule coefficients in
// double precision on the host: "trailing" timestep spacing, DDIM (eta = 0 deterministic, eta = 1 = DDPM's
// posterior) or ancestral DDPM with the "fixed_small" posterior variance, x0 clamped to [-1, 1] by default; for
// flow matching sampling.flow_sample: Euler (the default) or Heun from t = 1 to 0 on the grid of
// FlowMatchingSchedule.inference_times.
// The noise is drawn on the CPU from a seeded generator (reproducible whatever the device).
//
// Output: sample_0000.png ... (8-bit greyscale or RGB PNG), pixel = round((x + 1) * 127.5), and grid.png with
// all samples. --format netpbm writes PGM (grey, P5) / PPM (RGB, P6) instead. The PNG writer needs no library:
// the image data go into stored (uncompressed) deflate blocks, with the CRC-32 and Adler-32 computed here.

#include <torch/script.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string model;
  std::string schedule;
  std::string out = "samples";
  int64_t num_samples = 16;
  int64_t batch_size = 0;  // 0: all samples in one batch
  int64_t steps = 50;
  std::string sampler;  // default: ddim for a DDPM schedule, euler for flow matching
  double eta = 0.0;
  uint64_t seed = 0;
  std::string device = "cpu";
  bool clip = true;
  std::string format = "png";
  std::vector<int64_t> classes;  // empty: none given; else cycled over the samples
  double guidance_scale = 1.0;
};

[[noreturn]] void usage_error(const std::string& message) {
  if (!message.empty()) std::cerr << "rd_sample: " << message << "\n";
  std::cerr << "usage: rd_sample --model MODEL.torchscript.pt --schedule MODEL.schedule.txt [--out DIR]\n"
               "                 [--num-samples N] [--batch-size N] [--steps S] [--sampler ddim|ddpm|euler|heun]\n"
               "                 [--eta E] [--seed S] [--device cpu|cuda] [--no-clip] [--format png|netpbm]\n"
               "                 [--class C[,C...]] [--guidance-scale W]\n";
  std::exit(message.empty() ? 0 : 2);
}

int64_t parse_int(const std::string& flag, const std::string& value, int64_t minimum) {
  try {
    size_t used = 0;
    const long long parsed = std::stoll(value, &used);
    if (used != value.size() || parsed < minimum) throw std::invalid_argument(value);
    return parsed;
  } catch (const std::exception&) {
    usage_error(flag + " expects an integer >= " + std::to_string(minimum) + ", got '" + value + "'");
  }
}

Options parse_args(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") usage_error("");
    if (flag == "--no-clip") {
      options.clip = false;
      continue;
    }
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--model") options.model = value;
    else if (flag == "--schedule") options.schedule = value;
    else if (flag == "--out") options.out = value;
    else if (flag == "--num-samples") options.num_samples = parse_int(flag, value, 1);
    else if (flag == "--batch-size") options.batch_size = parse_int(flag, value, 1);
    else if (flag == "--steps") options.steps = parse_int(flag, value, 1);
    else if (flag == "--seed") options.seed = static_cast<uint64_t>(parse_int(flag, value, 0));
    else if (flag == "--sampler") options.sampler = value;
    else if (flag == "--device") options.device = value;
    else if (flag == "--format") options.format = value;
    else if (flag == "--eta") {
      try {
        options.eta = std::stod(value);
      } catch (const std::exception&) {
        usage_error("--eta expects a number, got '" + value + "'");
      }
      if (!(options.eta >= 0.0)) usage_error("--eta must be >= 0");
    } else if (flag == "--class") {
      // A comma list, e.g. 0,1,2; repeating --class appends.
      std::istringstream items(value);
      std::string item;
      bool any = false;
      while (std::getline(items, item, ',')) {
        options.classes.push_back(parse_int(flag, item, 0));
        any = true;
      }
      if (!any || value.back() == ',')
        usage_error("--class expects an integer >= 0 or a comma list, got '" + value + "'");
    } else if (flag == "--guidance-scale") {
      try {
        size_t used = 0;
        options.guidance_scale = std::stod(value, &used);
        if (used != value.size()) throw std::invalid_argument(value);
      } catch (const std::exception&) {
        usage_error("--guidance-scale expects a number, got '" + value + "'");
      }
      if (!std::isfinite(options.guidance_scale) || options.guidance_scale < 0.0)
        usage_error("--guidance-scale must be a finite number >= 0 (1: no guidance), got '" + value + "'");
    } else {
      usage_error("unknown argument " + flag);
    }
  }
  if (options.model.empty()) usage_error("--model is required");
  if (options.schedule.empty()) usage_error("--schedule is required");
  if (!options.sampler.empty() && options.sampler != "ddim" && options.sampler != "ddpm" &&
      options.sampler != "euler" && options.sampler != "heun")
    usage_error("--sampler must be ddim, ddpm (DDPM models), euler or heun (flow matching)");
  if (options.format != "png" && options.format != "netpbm") usage_error("--format must be png or netpbm");
  return options;
}

struct Schedule {
  std::string process = "vp";  // "vp": a DDPM schedule (alphas_cumprod); "flow": flow matching
  std::vector<double> alphas_cumprod;
  double shift = 1.0;          // flow matching
  int64_t num_train = 0;       // the training steps (flow: the model's timestep is t * num_train)
  std::string prediction_type;
  std::vector<int64_t> image_shape;  // C, H, W
  int64_t num_classes = 0;     // 0: an unconditional model
  int64_t null_label = -1;
};

Schedule read_schedule(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error("cannot open schedule file " + path);
  Schedule schedule;
  std::map<std::string, std::string> header;
  std::string line;
  while (std::getline(file, line)) {
    if (line.empty()) continue;
    if (line[0] == '#') {
      std::istringstream fields(line.substr(1));
      std::string key, rest;
      fields >> key;
      std::getline(fields >> std::ws, rest);
      header[key] = rest;
    } else {
      schedule.alphas_cumprod.push_back(std::stod(line));
    }
  }
  if (header["format"] != "robust_diffusion-schedule-v1")
    throw std::runtime_error(path + " is not a robust_diffusion-schedule-v1 file");
  schedule.prediction_type = header["prediction_type"];
  std::istringstream shape(header["image_shape"]);
  for (int64_t size; shape >> size;) schedule.image_shape.push_back(size);
  if (schedule.image_shape.size() != 3) throw std::runtime_error(path + ": image_shape must be C H W");
  const auto expected = std::stoll(header["num_train_timesteps"]);
  schedule.num_train = expected;
  if (header.count("num_classes")) {
    schedule.num_classes = std::stoll(header["num_classes"]);
    schedule.null_label = header.count("null_label") ? std::stoll(header["null_label"]) : schedule.num_classes;
    // The UNet's embedding has rows 0..K (K the null label); any other null label is not a file export_model wrote.
    if (schedule.num_classes < 1 || schedule.null_label != schedule.num_classes)
      throw std::runtime_error(path + ": num_classes must be positive and null_label equal to it");
  }
  if (header.count("process")) schedule.process = header["process"];
  if (schedule.process == "flow") {
    schedule.shift = std::stod(header["shift"]);
    if (!(schedule.shift > 0.0) || expected < 1 || !schedule.alphas_cumprod.empty())
      throw std::runtime_error(path + ": a flow schedule needs a positive shift and num_train_timesteps, no values");
    return schedule;
  }
  if (schedule.process != "vp") throw std::runtime_error(path + ": unknown process '" + schedule.process + "'");
  if (static_cast<int64_t>(schedule.alphas_cumprod.size()) != expected)
    throw std::runtime_error(path + ": expected " + std::to_string(expected) + " alphas_cumprod values");
  return schedule;
}

// sampling.inference_timesteps(..., spacing="trailing"); nearbyint rounds half to even like Python's round.
std::vector<int64_t> trailing_timesteps(int64_t num_train, int64_t num_steps) {
  std::vector<int64_t> steps;
  for (int64_t k = 0; k < num_steps; ++k) {
    const double value = static_cast<double>(num_train) - static_cast<double>(k) * num_train / num_steps;
    steps.push_back(static_cast<int64_t>(std::nearbyint(value)) - 1);
  }
  return steps;
}

// FlowMatchingSchedule.inference_times: num_steps times uniform from 1 to 1 / num_train, shifted, then 0 (the same
// linspace kernel and shift arithmetic as in Python, so the grids are equal to the last bit).
std::vector<double> flow_times(const Schedule& schedule, int64_t num_steps) {
  const at::Tensor u = num_steps > 1 ? at::linspace(1.0, 1.0 / static_cast<double>(schedule.num_train), num_steps,
                                                    at::TensorOptions(at::kDouble))
                                     : at::ones({1}, at::TensorOptions(at::kDouble));
  const at::Tensor shifted = schedule.shift * u / (1.0 + (schedule.shift - 1.0) * u);
  std::vector<double> times(shifted.data_ptr<double>(), shifted.data_ptr<double>() + shifted.numel());
  times.push_back(0.0);
  return times;
}

// sampling.predict_x0_and_epsilon.
std::pair<at::Tensor, at::Tensor> predict_x0_and_epsilon(const at::Tensor& x_t, const at::Tensor& output,
                                                         double abar, const std::string& kind, bool clip) {
  const double a = std::sqrt(abar), s = std::sqrt(1.0 - abar);
  at::Tensor x0, eps;
  if (kind == "epsilon") {
    if (a == 0.0) throw std::runtime_error("epsilon prediction cannot recover x0 at zero terminal SNR");
    eps = output;
    x0 = (x_t - s * output) / a;
  } else if (kind == "sample") {
    x0 = output;
    eps = s > 0.0 ? (x_t - a * output) / s : at::zeros_like(x_t);
  } else if (kind == "v_prediction") {
    x0 = a * x_t - s * output;
    eps = s * x_t + a * output;
  } else {
    throw std::runtime_error("unknown prediction_type '" + kind + "'");
  }
  if (clip) {
    x0 = x0.clamp(-1.0, 1.0);
    if (s > 0.0) eps = (x_t - a * x0) / s;
  }
  return {x0, eps};
}

// sampling.ddim_step.
at::Tensor ddim_step(const at::Tensor& x_t, const at::Tensor& output, double abar_t, double abar_prev, double eta,
                     const std::optional<at::Tensor>& noise, const std::string& kind, bool clip) {
  auto [x0, eps] = predict_x0_and_epsilon(x_t, output, abar_t, kind, clip);
  const double one_minus_t = 1.0 - abar_t;
  double variance = 0.0;
  if (one_minus_t > 0.0 && abar_prev > 0.0)
    variance = (1.0 - abar_prev) / one_minus_t * (1.0 - abar_t / abar_prev);
  const double sigma = eta * std::sqrt(std::max(variance, 0.0));
  const double direction = std::sqrt(std::max(1.0 - abar_prev - sigma * sigma, 0.0));
  at::Tensor x_prev = std::sqrt(abar_prev) * x0 + direction * eps;
  if (noise && sigma > 0.0) x_prev = x_prev + sigma * *noise;
  return x_prev;
}

// sampling.ddpm_step with variance_type "fixed_small".
at::Tensor ddpm_step(const at::Tensor& x_t, const at::Tensor& output, double abar_t, double abar_prev,
                     const std::optional<at::Tensor>& noise, const std::string& kind, bool clip) {
  auto [x0, eps] = predict_x0_and_epsilon(x_t, output, abar_t, kind, clip);
  const double alpha = abar_t / abar_prev, beta = 1.0 - alpha, one_minus_t = 1.0 - abar_t;
  double coef_x0 = 1.0, coef_xt = 0.0, variance = 0.0;
  if (one_minus_t > 0.0) {
    coef_x0 = std::sqrt(abar_prev) * beta / one_minus_t;
    coef_xt = std::sqrt(alpha) * (1.0 - abar_prev) / one_minus_t;
    variance = beta * (1.0 - abar_prev) / one_minus_t;
  }
  at::Tensor mean = coef_x0 * x0 + coef_xt * x_t;
  if (!noise) return mean;
  return mean + std::sqrt(std::max(variance, 0.0)) * *noise;
}

// One image [C, H, W] in [-1, 1] -> bytes, row-major, channels interleaved.
std::vector<uint8_t> to_bytes(const at::Tensor& image) {
  const at::Tensor pixels = ((image.to(at::kCPU, at::kDouble) + 1.0) * 127.5).round().clamp(0.0, 255.0)
                                .to(at::kByte).permute({1, 2, 0}).contiguous();
  const uint8_t* data = pixels.data_ptr<uint8_t>();
  return std::vector<uint8_t>(data, data + pixels.numel());
}

struct Image {
  std::vector<uint8_t> bytes;  // row-major, channels interleaved
  int64_t channels, height, width;
};

void write_netpbm(const std::filesystem::path& path, const Image& image) {
  std::ofstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot write " + path.string());
  file << (image.channels == 1 ? "P5" : "P6") << "\n" << image.width << " " << image.height << "\n255\n";
  file.write(reinterpret_cast<const char*>(image.bytes.data()), static_cast<std::streamsize>(image.bytes.size()));
  if (!file) throw std::runtime_error("cannot write " + path.string());
}

// CRC-32 (ISO 3309, reflected polynomial 0xEDB88320) of PNG chunks, continued from `crc`.
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

// Adler-32 of the zlib stream's uncompressed data (RFC 1950).
uint32_t adler32(const std::vector<uint8_t>& data) {
  uint32_t a = 1, b = 0;
  for (const uint8_t byte : data) {
    a = (a + byte) % 65521u;
    b = (b + a) % 65521u;
  }
  return (b << 16) | a;
}

void put_be32(std::vector<uint8_t>& out, uint32_t value) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(value >> shift));
}

void write_chunk(std::ofstream& file, const char type[4], const std::vector<uint8_t>& data) {
  std::vector<uint8_t> chunk;
  put_be32(chunk, static_cast<uint32_t>(data.size()));
  chunk.insert(chunk.end(), type, type + 4);
  chunk.insert(chunk.end(), data.begin(), data.end());
  put_be32(chunk, crc32(chunk.data() + 4, chunk.size() - 4));  // over type and data, not the length
  file.write(reinterpret_cast<const char*>(chunk.data()), static_cast<std::streamsize>(chunk.size()));
}

// An 8-bit greyscale (colour type 0) or RGB (colour type 2) PNG; each row has filter type 0 (none) and the
// zlib stream holds stored deflate blocks (BTYPE 00, at most 65535 bytes each), so no compressor is needed.
void write_png(const std::filesystem::path& path, const Image& image) {
  const size_t row = static_cast<size_t>(image.width * image.channels);
  std::vector<uint8_t> raw;
  raw.reserve((row + 1) * static_cast<size_t>(image.height));
  for (int64_t y = 0; y < image.height; ++y) {
    raw.push_back(0);  // filter type: none
    raw.insert(raw.end(), image.bytes.begin() + y * row, image.bytes.begin() + (y + 1) * row);
  }
  std::vector<uint8_t> zlib = {0x78, 0x01};  // deflate, 32 KiB window; (0x78 * 256 + 0x01) % 31 == 0
  for (size_t start = 0; start < raw.size(); start += 65535) {
    const size_t size = std::min<size_t>(65535, raw.size() - start);
    zlib.push_back(start + size == raw.size() ? 1 : 0);  // BFINAL on the last block, BTYPE 00
    const uint16_t len = static_cast<uint16_t>(size), nlen = static_cast<uint16_t>(~len);
    for (const uint16_t v : {len, nlen}) {  // little-endian, unlike the rest of PNG
      zlib.push_back(static_cast<uint8_t>(v & 0xFFu));
      zlib.push_back(static_cast<uint8_t>(v >> 8));
    }
    zlib.insert(zlib.end(), raw.begin() + start, raw.begin() + start + size);
  }
  put_be32(zlib, adler32(raw));

  std::vector<uint8_t> header;
  put_be32(header, static_cast<uint32_t>(image.width));
  put_be32(header, static_cast<uint32_t>(image.height));
  header.insert(header.end(), {8, static_cast<uint8_t>(image.channels == 1 ? 0 : 2), 0, 0, 0});
  std::ofstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot write " + path.string());
  static const uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  file.write(reinterpret_cast<const char*>(signature), sizeof(signature));
  write_chunk(file, "IHDR", header);
  write_chunk(file, "IDAT", zlib);
  write_chunk(file, "IEND", {});
  if (!file) throw std::runtime_error("cannot write " + path.string());
}

void write_image(const std::filesystem::path& stem, const Image& image, const std::string& format) {
  if (format == "png") write_png(stem.string() + ".png", image);
  else write_netpbm(stem.string() + (image.channels == 1 ? ".pgm" : ".ppm"), image);
}

// All samples in a near-square grid with a 2-pixel black border between them.
Image make_grid(const at::Tensor& samples) {
  const int64_t n = samples.size(0), c = samples.size(1), h = samples.size(2), w = samples.size(3);
  const int64_t columns = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n))));
  const int64_t rows = (n + columns - 1) / columns, pad = 2;
  const int64_t grid_h = rows * (h + pad) + pad, grid_w = columns * (w + pad) + pad;
  Image grid{std::vector<uint8_t>(static_cast<size_t>(grid_h * grid_w * c), 0), c, grid_h, grid_w};
  for (int64_t i = 0; i < n; ++i) {
    const auto bytes = to_bytes(samples[i]);
    const int64_t top = pad + (i / columns) * (h + pad), left = pad + (i % columns) * (w + pad);
    for (int64_t y = 0; y < h; ++y)
      std::copy_n(bytes.begin() + y * w * c, w * c, grid.bytes.begin() + ((top + y) * grid_w + left) * c);
  }
  return grid;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_args(argc, argv);
  try {
    const Schedule schedule = read_schedule(options.schedule);
    const bool flow = schedule.process == "flow";
    const std::string sampler = !options.sampler.empty() ? options.sampler : flow ? "euler" : "ddim";
    if (flow && sampler != "euler" && sampler != "heun")
      usage_error("--sampler must be euler or heun for a flow-matching model, got " + sampler);
    if (!flow && sampler != "ddim" && sampler != "ddpm")
      usage_error("--sampler must be ddim or ddpm for a DDPM model, got " + sampler);
    const int64_t num_train = schedule.num_train;
    if (!flow && options.steps > num_train)
      usage_error("--steps must be at most the number of training steps, " + std::to_string(num_train));
    const bool conditional = schedule.num_classes > 0;
    const int64_t null_label = schedule.null_label;
    if (!conditional && !options.classes.empty())
      usage_error("--class needs a class-conditional export: " + options.schedule + " has no num_classes");
    if (!conditional && options.guidance_scale != 1.0)
      usage_error("--guidance-scale guides a class-conditional model, and " + options.schedule +
                  " has no num_classes");
    if (conditional && options.classes.empty())
      usage_error("the model is class-conditional (" + std::to_string(schedule.num_classes) + " classes): pass " +
                  "--class C, C in 0.." + std::to_string(schedule.num_classes - 1) + " (or " +
                  std::to_string(null_label) + ", the null label, for unconditional samples)");
    for (const int64_t label : options.classes)
      if (label > null_label)
        usage_error("--class " + std::to_string(label) + " is out of range: the model has classes 0.." +
                    std::to_string(schedule.num_classes - 1) + " and the null label " + std::to_string(null_label));
    if (!std::filesystem::is_regular_file(options.model))
      throw std::runtime_error("model file not found: " + options.model);
    const at::Device device(options.device);
    torch::jit::script::Module model = torch::jit::load(options.model, device);
    model.eval();
    c10::InferenceMode inference;

    const auto& abar = schedule.alphas_cumprod;
    const auto timesteps = flow ? std::vector<int64_t>{} : trailing_timesteps(num_train, options.steps);
    const auto times = flow ? flow_times(schedule, options.steps) : std::vector<double>{};
    const auto& shape = schedule.image_shape;
    const std::string& kind = schedule.prediction_type;
    if (kind == "epsilon" && abar[timesteps[0]] == 0.0)
      throw std::runtime_error("zero terminal SNR: epsilon prediction cannot recover x0 at the first step");
    auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
    const bool needs_noise = sampler == "ddpm" || options.eta > 0.0;
    // sampling._denoiser: the model's prediction, given the batch's labels if it is conditional, guided with
    // the null label's prediction from the second half of one 2B call unless the scale is 1.
    const double guidance = options.guidance_scale;
    auto denoise = [&](const at::Tensor& x, const at::Tensor& t, const at::Tensor& labels) {
      if (!conditional) return model.forward({x, t}).toTensor();
      if (guidance == 1.0) return model.forward({x, t, labels}).toTensor();
      const at::Tensor both = at::cat({labels, at::full_like(labels, null_label)});
      const auto halves = model.forward({at::cat({x, x}), at::cat({t, t}), both}).toTensor().chunk(2);
      return halves[1] + guidance * (halves[0] - halves[1]);
    };
    // sampling.flow_sample's velocity: the model at time t, given t * num_train_timesteps as float32.
    auto velocity = [&](const at::Tensor& x, double t, const at::Tensor& labels) {
      const at::Tensor time = at::full({x.size(0)}, t, at::TensorOptions(at::kFloat).device(device)) * num_train;
      return denoise(x, time, labels).to(at::kFloat);
    };
    auto randn = [&](int64_t batch) {
      return at::randn({batch, shape[0], shape[1], shape[2]}, generator, at::TensorOptions(at::kFloat)).to(device);
    };

    const int64_t batch_size = options.batch_size > 0 ? options.batch_size : options.num_samples;
    std::vector<at::Tensor> batches;
    for (int64_t start = 0; start < options.num_samples; start += batch_size) {
      const int64_t batch = std::min(batch_size, options.num_samples - start);
      at::Tensor x = randn(batch);
      at::Tensor labels;  // sample i's class: the (i mod n)-th --class value
      if (conditional) {
        std::vector<int64_t> values;
        for (int64_t i = start; i < start + batch; ++i)
          values.push_back(options.classes[static_cast<size_t>(i) % options.classes.size()]);
        labels = at::tensor(values, at::TensorOptions(at::kLong)).to(device);
      }
      for (size_t i = 0; i + 1 < times.size(); ++i) {  // flow matching (sampling.flow_step)
        const double t = times[i], t_next = times[i + 1];
        const at::Tensor v = velocity(x, t, labels);
        const at::Tensor euler = x + (t_next - t) * v;
        x = sampler == "heun" && t_next > 0.0 ? x + (t_next - t) * ((v + velocity(euler, t_next, labels)) / 2)
                                              : euler;
      }
      for (size_t i = 0; i < timesteps.size(); ++i) {
        const int64_t t = timesteps[i];
        const int64_t prev_t = i + 1 < timesteps.size() ? timesteps[i + 1] : -1;
        const double abar_prev = prev_t >= 0 ? abar[prev_t] : 1.0;
        const at::Tensor t_batch = at::full({batch}, t, at::TensorOptions(at::kLong).device(device));
        const at::Tensor output = denoise(x, t_batch, labels).to(at::kFloat);
        std::optional<at::Tensor> noise;
        if (needs_noise && prev_t >= 0) noise = randn(batch);
        x = sampler == "ddim"
                ? ddim_step(x, output, abar[t], abar_prev, options.eta, noise, kind, options.clip)
                : ddpm_step(x, output, abar[t], abar_prev, noise, kind, options.clip);
      }
      batches.push_back(x.to(at::kCPU));
    }
    const at::Tensor samples = at::cat(batches);

    const std::filesystem::path out(options.out);
    std::filesystem::create_directories(out);
    if (shape[0] != 1 && shape[0] != 3) throw std::runtime_error("only 1- or 3-channel images can be written");
    for (int64_t i = 0; i < samples.size(0); ++i) {
      char name[32];
      std::snprintf(name, sizeof(name), "sample_%04lld", static_cast<long long>(i));
      write_image(out / name, Image{to_bytes(samples[i]), shape[0], shape[1], shape[2]}, options.format);
    }
    write_image(out / "grid", make_grid(samples), options.format);
    std::cout << "wrote " << samples.size(0) << " samples (" << sampler << ", " << options.steps
              << " steps, " << kind << " prediction";
    if (conditional) std::cout << ", guidance scale " << guidance;
    std::cout << ") to " << out.string() << "; mean "
              << samples.mean().item<double>() << ", std " << samples.std().item<double>() << std::endl;
  } catch (const c10::Error& error) {  // LibTorch's errors carry a C++ backtrace: print the message only
    std::cerr << "rd_sample: " << error.what_without_backtrace() << std::endl;
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "rd_sample: " << error.what() << std::endl;
    return 1;
  }
  return 0;
}
