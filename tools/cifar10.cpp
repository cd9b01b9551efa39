#include "tools/cifar10.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "engine/random.h"
#include "kernels/common/error.h"
#include "kernels/cpu/parallel.h"

namespace sp::data {

namespace {

constexpr int64_t kFileBytes = kCifarRecordsPerFile * kCifarRecordBytes;
constexpr int64_t kPlane = kCifarSide * kCifarSide;

// Distinct streams for the two uses, so an epoch's order and its augmentations are independent.
constexpr uint64_t kOrderStream = 0x6f72646572ull;  // "order"
constexpr uint64_t kAugmentStream = 0x617567ull;    // "aug"

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

}  // namespace

std::vector<std::string> cifar10_file_names(Split split) {
  if (split == Split::Test) return {"test_batch.bin"};
  return {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"};
}

Dataset read_cifar10_batch_file(const std::string& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw Error("CIFAR-10 file '" + path + "': cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(::fileno(f.get()), &st) != 0 || !S_ISREG(st.st_mode))
    throw Error("CIFAR-10 file '" + path + "': not a regular file");
  if (int64_t(st.st_size) != kFileBytes)
    throw Error(detail::concat("CIFAR-10 file '", path, "': ", int64_t(st.st_size), " bytes, expected ", kFileBytes,
                               " (", kCifarRecordsPerFile, " records of ", kCifarRecordBytes,
                               " bytes); the file is truncated or not a CIFAR-10 binary batch"));
  std::vector<uint8_t> raw(static_cast<size_t>(kFileBytes));
  if (std::fread(raw.data(), 1, raw.size(), f.get()) != raw.size())
    throw Error("CIFAR-10 file '" + path + "': " +
                (std::ferror(f.get()) ? std::string("read error: ") + std::strerror(errno)
                                      : std::string("shorter than its size said (changed while being read?)")));

  Dataset d;
  d.labels.resize(size_t(kCifarRecordsPerFile));
  d.images.resize(size_t(kCifarRecordsPerFile * kCifarImageBytes));
  for (int64_t r = 0; r < kCifarRecordsPerFile; ++r) {
    const uint8_t* rec = raw.data() + r * kCifarRecordBytes;
    if (rec[0] >= kCifarClasses)
      throw Error(detail::concat("CIFAR-10 file '", path, "': record ", r, " has label ", int(rec[0]), ", expected 0-",
                                 kCifarClasses - 1));
    d.labels[size_t(r)] = rec[0];
    // Planar (R plane, G plane, B plane) to interleaved NHWC.
    const uint8_t* planes = rec + 1;
    uint8_t* img = d.images.data() + r * kCifarImageBytes;
    for (int64_t i = 0; i < kPlane; ++i)
      for (int64_t c = 0; c < kCifarChannels; ++c) img[i * kCifarChannels + c] = planes[c * kPlane + i];
  }
  return d;
}

Dataset load_cifar10(const std::string& dir, Split split, int64_t limit) {
  Dataset out;
  for (const std::string& name : cifar10_file_names(split)) {
    if (limit >= 0 && out.size() >= limit) break;
    Dataset part = read_cifar10_batch_file(join_path(dir, name));
    out.labels.insert(out.labels.end(), part.labels.begin(), part.labels.end());
    out.images.insert(out.images.end(), part.images.begin(), part.images.end());
  }
  if (limit >= 0 && out.size() > limit) {
    out.labels.resize(size_t(limit));
    out.images.resize(size_t(limit * kCifarImageBytes));
  }
  return out;
}

std::string resolve_cifar10_dir(const std::string& flag_value, const std::vector<Split>& needed) {
  std::string dir, source;
  const char* env = std::getenv("CIFAR10_DIR");
  if (!flag_value.empty()) {
    dir = flag_value, source = "given on the command line";
  } else if (env && *env) {
    dir = env, source = "from $CIFAR10_DIR";
  } else {
    dir = "./data/cifar-10-batches-bin", source = "the default; set $CIFAR10_DIR or pass a directory to change it";
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
    throw Error("CIFAR-10: '" + dir + "' (" + source + ") is a file, not a directory: give the directory that holds " +
                "data_batch_1.bin ... test_batch.bin");
  std::string missing;
  for (Split split : needed)
    for (const std::string& name : cifar10_file_names(split)) {
      const std::string path = join_path(dir, name);
      struct stat file_st;
      if (::stat(path.c_str(), &file_st) != 0) {
        missing += (missing.empty() ? "" : ", ") + name;
        continue;
      }
      // Something else under that name (a directory, say) is no data file, and is named as such.
      SP_CHECK(S_ISREG(file_st.st_mode), "CIFAR-10: '", path, "' (", source, ") is not a regular file");
    }
  if (!missing.empty())
    throw Error("CIFAR-10 binary files not found in '" + dir + "' (" + source + "): missing " + missing +
                ". Fetch them with: tools/fetch_cifar10.sh " + dir);
  return dir;
}

Normalization compute_normalization(const Dataset& data) {
  SP_CHECK(data.size() > 0 && int64_t(data.images.size()) == data.size() * kCifarImageBytes,
           "compute_normalization: need a non-empty data set with ", kCifarImageBytes, " bytes per image");
  // Exact integer sums: 60000 images * 1024 pixels * 255^2 is far below 2^64.
  uint64_t sum[3] = {0, 0, 0}, sum_sq[3] = {0, 0, 0};
  for (size_t i = 0; i < data.images.size(); ++i) {
    const uint64_t p = data.images[i];
    sum[i % 3] += p;
    sum_sq[i % 3] += p * p;
  }
  const double count = double(data.size()) * double(kPlane);
  Normalization n{};
  for (int c = 0; c < 3; ++c) {
    const double mean = double(sum[c]) / count / 255.0;
    const double var = double(sum_sq[c]) / count / (255.0 * 255.0) - mean * mean;
    n.mean[size_t(c)] = float(mean);
    n.std[size_t(c)] = float(std::sqrt(std::max(var, 0.0)));
  }
  return n;
}

Augmentation sample_augmentation(uint64_t seed, int64_t epoch, int64_t position, int cutout) {
  SP_CHECK(cutout >= 0 && cutout <= kCifarSide, "cutout ", cutout, " outside 0..", kCifarSide);
  SplitMix rng(random_key(seed, kAugmentStream, uint64_t(epoch), uint64_t(position)));
  Augmentation a;
  a.crop_y = int(rng.below(2 * kCifarPad + 1));
  a.crop_x = int(rng.below(2 * kCifarPad + 1));
  a.flip = rng.below(2) == 1;
  if (cutout > 0) {  // drawn after the crop and flip, which therefore stay as they were
    a.cutout = cutout;
    a.cutout_y = int(rng.below(kCifarSide));
    a.cutout_x = int(rng.below(kCifarSide));
  }
  return a;
}

void augment_normalize(const uint8_t* src, const Augmentation& aug, const Normalization& norm, float* dst) {
  SP_CHECK(aug.crop_y >= 0 && aug.crop_y <= 2 * kCifarPad && aug.crop_x >= 0 && aug.crop_x <= 2 * kCifarPad,
           "crop offset (", aug.crop_y, ", ", aug.crop_x, ") outside 0..", 2 * kCifarPad);
  // (p / 255 - mean) / std as one multiply-add per value.
  float scale[3], bias[3];
  for (int c = 0; c < 3; ++c) {
    scale[c] = 1.f / (255.f * norm.std[size_t(c)]);
    bias[c] = -norm.mean[size_t(c)] / norm.std[size_t(c)];
  }
  constexpr int S = kCifarSide;
  for (int y = 0; y < S; ++y) {
    const int sy = y + aug.crop_y - kCifarPad;
    float* out_row = dst + y * S * 3;
    for (int x = 0; x < S; ++x) {
      // Crop, then mirror the crop: output column x comes from crop column 31 - x.
      const int sx = (aug.flip ? S - 1 - x : x) + aug.crop_x - kCifarPad;
      float* o = out_row + x * 3;
      if (sy < 0 || sy >= S || sx < 0 || sx >= S) {
        for (int c = 0; c < 3; ++c) o[c] = bias[c];
      } else {
        const uint8_t* p = src + (sy * S + sx) * 3;
        for (int c = 0; c < 3; ++c) o[c] = float(p[c]) * scale[c] + bias[c];
      }
    }
  }
  if (aug.cutout > 0) {
    SP_CHECK(aug.cutout <= S && aug.cutout_y >= 0 && aug.cutout_y < S && aug.cutout_x >= 0 && aug.cutout_x < S,
             "cutout of side ", aug.cutout, " at (", aug.cutout_y, ", ", aug.cutout_x, ") outside the image");
    const int y0 = std::max(0, aug.cutout_y - aug.cutout / 2), y1 = std::min(S, aug.cutout_y - aug.cutout / 2 + aug.cutout);
    const int x0 = std::max(0, aug.cutout_x - aug.cutout / 2), x1 = std::min(S, aug.cutout_x - aug.cutout / 2 + aug.cutout);
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x)
        for (int c = 0; c < 3; ++c) dst[(y * S + x) * 3 + c] = 0.f;
  }
}

std::string digest(const Dataset& data) {
  // 64-bit words in four interleaved lanes, each word through xxHash64's round (multiply, rotate,
  // multiply: every bit of a word reaches every bit of its lane, so differences cannot cancel
  // as they can where a multiply alone carries them only upwards), the lanes merged and the
  // result avalanched. The four lanes' chains overlap: the 150 MB training set in 21 ms on the
  // 2-core development machine.
  constexpr uint64_t k1 = 0x9e3779b185ebca87ull, k2 = 0xc2b2ae3d27d4eb4full;
  const auto rotl = [](uint64_t x, int r) { return (x << r) | (x >> (64 - r)); };
  const auto round = [&](uint64_t acc, uint64_t w) { return rotl(acc + w * k2, 31) * k1; };
  uint64_t lane[4] = {k1 + k2, k2, 0, 0 - k1};
  uint64_t count = 0;  // words taken
  const auto add = [&](uint64_t w) {
    uint64_t& l = lane[count++ % 4];
    l = round(l, w);
  };
  const auto add_bytes = [&](const uint8_t* p, size_t n) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {  // four words, one per lane
      uint64_t w[4];
      std::memcpy(w, p + i, 32);
      for (int l = 0; l < 4; ++l) add(w[l]);
    }
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      add(w);
    }
    uint64_t tail = 0;
    if (i < n) std::memcpy(&tail, p + i, n - i);
    add(tail ^ (uint64_t(n - i) << 56));
  };
  add(uint64_t(data.size()));
  add_bytes(data.images.data(), data.images.size());
  add_bytes(reinterpret_cast<const uint8_t*>(data.labels.data()), data.labels.size() * sizeof(int32_t));
  uint64_t h = rotl(lane[0], 1) + rotl(lane[1], 7) + rotl(lane[2], 12) + rotl(lane[3], 18);
  for (uint64_t l : lane) h = (h ^ round(0, l)) * k1 + 0x85ebca77c2b2ae63ull;
  h ^= h >> 33, h *= k2, h ^= h >> 29, h *= 0x165667b19e3779f9ull, h ^= h >> 32;
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

std::vector<int64_t> epoch_order(int64_t n, bool shuffle, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  if (!shuffle) return order;
  SplitMix rng(random_key(seed, kOrderStream, uint64_t(epoch), 0));
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[size_t(i)], order[rng.below(uint64_t(i) + 1)]);
  return order;
}

int64_t batches_per_epoch(int64_t n, int64_t batch_size, bool drop_last) {
  SP_CHECK(batch_size > 0, "batch size must be positive, got ", batch_size);
  return drop_last ? n / batch_size : n / batch_size + (n % batch_size != 0);  // no n + batch_size - 1: it overflows
}

void fill_batch(const Dataset& data, const std::vector<int64_t>& order, const LoaderOptions& opts, int64_t epoch,
                int64_t index, float* images, int32_t* labels, int64_t* sample_ids) {
  const int64_t n = data.size();
  SP_CHECK(int64_t(order.size()) == n, "fill_batch: order has ", order.size(), " entries for ", n, " samples");
  SP_CHECK(index >= 0 && index < batches_per_epoch(n, opts.batch_size, opts.drop_last), "fill_batch: batch ", index,
           " out of range");
  const int64_t start = index * opts.batch_size, count = std::min(opts.batch_size, n - start);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t id = order[size_t(start + i)];
    sample_ids[i] = id;
    labels[i] = data.labels[size_t(id)];
  }
  kernels::cpu::parallel_for(count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Augmentation aug =
          opts.augment ? sample_augmentation(opts.seed, epoch, start + i, opts.cutout) : Augmentation{};
      augment_normalize(data.images.data() + sample_ids[i] * kCifarImageBytes, aug, opts.norm,
                        images + i * kCifarImageBytes);
    }
  });
}

BatchLoader::BatchLoader(const Dataset& data, const LoaderOptions& opts)
    : data_(data),
      opts_(opts),
      batches_per_epoch_(data::batches_per_epoch(data.size(), opts.batch_size, opts.drop_last)) {
  SP_CHECK(int64_t(data.images.size()) == data.size() * kCifarImageBytes, "BatchLoader: data set has ",
           data.images.size(), " image bytes for ", data.size(), " labels");
  SP_CHECK(batches_per_epoch_ > 0, "BatchLoader: ", data.size(), " samples make no batch of ", opts.batch_size,
           opts.drop_last ? " with drop_last" : "");
  SP_CHECK(opts.prefetch >= 1, "BatchLoader: prefetch must be at least 1, got ", opts.prefetch);
  SP_CHECK(opts.cutout >= 0 && opts.cutout <= kCifarSide, "BatchLoader: cutout ", opts.cutout, " outside 0..",
           kCifarSide);
  // The prefetch depth plus the consumer's two: the producer fills the rest. Each slot holds the
  // largest batch there can be: no more than the data set (an --eval-batch-size of 50,000,000
  // asked for 614 GB of pinned memory for 10,000 test images).
  slots_.resize(size_t(opts.prefetch) + kHeld);
  slot_batch_ = std::min<int64_t>(opts.batch_size, data.size());
  const size_t image_bytes = size_t(slot_batch_ * kCifarImageBytes) * sizeof(float);
  for (size_t s = 0; s < slots_.size(); ++s) {
    slots_[s].memory = PinnedBuffer(image_bytes + size_t(slot_batch_) * sizeof(int32_t));
    free_slots_.push_back(int(s));
  }
  producer_ = std::thread([this] { produce(); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  producer_.join();
}

void BatchLoader::produce() {
  // The order of the epoch being produced, kept across batches (epochs change rarely).
  std::vector<int64_t> order;
  int64_t order_epoch = -1;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || (!free_slots_.empty() && !error_); });
    if (stop_) return;
    const int s = free_slots_.back();
    free_slots_.pop_back();
    const int64_t epoch = produce_epoch_, index = produce_index_;
    const uint64_t generation = generation_;
    if (++produce_index_ == batches_per_epoch_) produce_index_ = 0, ++produce_epoch_;
    lk.unlock();

    std::exception_ptr error;
    try {
      if (order_epoch != epoch) {
        order = epoch_order(data_.size(), opts_.shuffle, opts_.seed, epoch);
        order_epoch = epoch;
      }
      Slot& slot = slots_[size_t(s)];
      const int64_t b = std::min(opts_.batch_size, data_.size() - index * opts_.batch_size);
      auto* base = static_cast<char*>(slot.memory.data());
      auto* labels = base + size_t(slot_batch_ * kCifarImageBytes) * sizeof(float);
      slot.batch.images = Tensor::from_blob(base, {b, kCifarSide, kCifarSide, kCifarChannels}, DType::F32);
      slot.batch.labels = Tensor::from_blob(labels, {b}, DType::I32);
      slot.batch.epoch = epoch;
      slot.batch.index_in_epoch = index;
      slot.batch.sample_ids.resize(size_t(b));
      fill_batch(data_, order, opts_, epoch, index, slot.batch.images.data<float>(), slot.batch.labels.data<int32_t>(),
                 slot.batch.sample_ids.data());
    } catch (...) {
      error = std::current_exception();
    }

    lk.lock();
    if (generation != generation_) {
      free_slots_.push_back(s);  // a seek() happened meanwhile: this batch is no longer wanted
    } else if (error) {
      error_ = error;
      free_slots_.push_back(s);
    } else {
      ready_.push_back(s);
    }
    cv_.notify_all();
  }
}

void BatchLoader::release_held_locked() {
  for (int s : held_) free_slots_.push_back(s);
  held_.clear();
}

const Batch& BatchLoader::next() {
  std::unique_lock<std::mutex> lk(mu_);
  if (held_.size() == kHeld) {  // the batch before the last one given goes back to the producer
    free_slots_.push_back(held_.front());
    held_.pop_front();
    cv_.notify_all();
  }
  cv_.wait(lk, [&] { return !ready_.empty() || error_; });
  // Batches finished before a failure are still handed out in order.
  if (ready_.empty()) std::rethrow_exception(error_);
  held_.push_back(ready_.front());
  ready_.pop_front();
  return slots_[size_t(held_.back())].batch;
}

void BatchLoader::seek(int64_t epoch, int64_t batch_index) {
  SP_CHECK(epoch >= 0 && batch_index >= 0 && batch_index < batches_per_epoch_, "BatchLoader::seek(", epoch, ", ",
           batch_index, "): position outside epochs >= 0 and batches 0..", batches_per_epoch_ - 1);
  {
    std::lock_guard<std::mutex> lk(mu_);
    release_held_locked();
    for (int s : ready_) free_slots_.push_back(s);
    ready_.clear();
    produce_epoch_ = epoch;
    produce_index_ = batch_index;
    ++generation_;
    error_ = nullptr;  // a failure at the old position says nothing about the new one
  }
  cv_.notify_all();
}

}  // namespace sp::data
