// CIFAR-10: reading the official binary release, normalisation, augmentation, batch loading.
//
// The binary release (https://www.cs.toronto.edu/~kriz/cifar.html) is six files,
// data_batch_1.bin ... data_batch_5.bin (train) and test_batch.bin (test), each exactly 10000
// records of 1 label byte and 3072 pixel bytes: the red, green and blue 32x32 planes, row-major.
// tools/fetch_cifar10.sh puts them into a directory.
//
// Determinism: the order of an epoch depends only on (seed, epoch), and the augmentation of a
// sample only on (seed, epoch, position in the epoch), so a batch is a pure function of
// (seed, epoch, batch index). Prefetching, thread counts and resuming with seek() do not change
// what a run sees.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/allocator.h"
#include "engine/tensor.h"

namespace sp::data {

constexpr int kCifarSide = 32;
constexpr int kCifarChannels = 3;
constexpr int64_t kCifarImageBytes = kCifarSide * kCifarSide * kCifarChannels;  // 3072
constexpr int64_t kCifarRecordBytes = 1 + kCifarImageBytes;                     // label + pixels
constexpr int64_t kCifarRecordsPerFile = 10000;
constexpr int kCifarClasses = 10;
constexpr int kCifarPad = 4;  // zero padding of the random crop, as in RandomCrop(32, padding=4)

enum class Split { Train, Test };

// Images as uint8 NHWC (n x 32 x 32 x 3, RGB); labels 0-9.
struct Dataset {
  std::vector<uint8_t> images;
  std::vector<int32_t> labels;
  int64_t size() const { return int64_t(labels.size()); }
};

// A digest of the data set's labels and pixels, 16 hex digits: two sets that differ in any label
// or pixel, or in order, almost surely differ in it (a checkpoint records the training set's, so
// that a resumed run trains on the same data). Not cryptographic.
std::string digest(const Dataset& data);

// The file names of a split, in the order their records are concatenated.
std::vector<std::string> cifar10_file_names(Split split);

// Reads one binary batch file. Throws sp::Error naming the path when the file is missing or
// unreadable, is not exactly 10000 records long, or holds a label outside 0-9.
Dataset read_cifar10_batch_file(const std::string& path);

// Reads a split from `dir`. limit >= 0 keeps the first `limit` images (all of them when the
// split has fewer), reading only the files needed; a negative limit keeps everything.
Dataset load_cifar10(const std::string& dir, Split split, int64_t limit = -1);

// The data directory: `flag_value` if non-empty, else $CIFAR10_DIR if set and non-empty, else
// ./data/cifar-10-batches-bin. Throws sp::Error, saying how to fetch the data, when the chosen
// directory lacks any file of the splits `needed` (training needs all six; eval the test batch).
std::string resolve_cifar10_dir(const std::string& flag_value,
                                const std::vector<Split>& needed = {Split::Train, Split::Test});

// Per-channel statistics of pixel values scaled to [0, 1]; normalised = (p / 255 - mean) / std.
struct Normalization {
  std::array<float, 3> mean;
  std::array<float, 3> std;
};

// The customary values of the CIFAR-10 training set (population statistics over all pixels).
constexpr Normalization kCifar10Normalization{{0.4914f, 0.4822f, 0.4465f}, {0.2470f, 0.2435f, 0.2616f}};

// Mean and population standard deviation of each channel over every pixel of `data`.
Normalization compute_normalization(const Dataset& data);

// Where a sample is cropped from the image zero-padded by kCifarPad pixels on each side,
// whether it is then mirrored, and the square cut out of the result (Cutout, DeVries & Taylor
// 2017); {kCifarPad, kCifarPad, false, 0} is the identity.
struct Augmentation {
  int crop_y = kCifarPad;  // top row of the crop in the padded 40x40 image, 0..8
  int crop_x = kCifarPad;  // left column, 0..8
  bool flip = false;
  int cutout = 0;                    // side of the square, 0..32 (0: none)
  int cutout_y = 0, cutout_x = 0;    // its centre in the 32x32 result, 0..31
};

// The augmentation of the sample at `position` of epoch `epoch` of a run seeded with `seed`:
// crop offsets uniform in 0..8 and a flip with probability 1/2, as torchvision's
// RandomCrop(32, padding=4) followed by RandomHorizontalFlip(); with cutout > 0, then a
// cutout x cutout square centred on a pixel drawn uniformly from the image, as in DeVries &
// Taylor's code (the centre may lie near the border, where the square is clipped; for an odd
// side their code cuts one row and column less). The crop and flip do not depend on cutout.
Augmentation sample_augmentation(uint64_t seed, int64_t epoch, int64_t position, int cutout = 0);

// Writes the float NHWC image (32 x 32 x 3) of uint8 image `src` cropped, flipped and
// normalised as described by `aug` and `norm`. Padding pixels have value 0 before
// normalisation, so they become -mean / std. The cutout square, rows and columns
// [centre - cutout / 2, centre - cutout / 2 + cutout) clipped to the image, is set to 0 after
// normalisation (the channel means), as DeVries & Taylor mask the normalised image.
void augment_normalize(const uint8_t* src, const Augmentation& aug, const Normalization& norm, float* dst);

struct LoaderOptions {
  int64_t batch_size = 128;
  bool shuffle = true;
  bool augment = false;
  int cutout = 0;  // with augment: the side of the square Cutout removes (0: none)
  uint64_t seed = 0;
  bool drop_last = false;  // false: the last batch of an epoch may be smaller
  int prefetch = 2;        // batches the producer prepares beyond the two the consumer holds (>= 1)
  Normalization norm = kCifar10Normalization;
};

// The order of the samples in an epoch: a permutation of 0..n-1 determined by (seed, epoch),
// or the identity without shuffling.
std::vector<int64_t> epoch_order(int64_t n, bool shuffle, uint64_t seed, int64_t epoch);

// Number of batches per epoch for `n` samples.
int64_t batches_per_epoch(int64_t n, int64_t batch_size, bool drop_last);

// Fills batch `index` of an epoch whose order is `order` (from epoch_order) synchronously:
// images [B, 32, 32, 3] normalised floats, labels [B] and sample ids [B], where B is the size
// of that batch. This is what BatchLoader's producer runs; tests use it as the reference.
void fill_batch(const Dataset& data, const std::vector<int64_t>& order, const LoaderOptions& opts, int64_t epoch,
                int64_t index, float* images, int32_t* labels, int64_t* sample_ids);

struct Batch {
  Tensor images;  // f32 [B, 32, 32, 3] on the CPU, in pinned host memory
  Tensor labels;  // i32 [B]
  int64_t epoch = 0;
  int64_t index_in_epoch = 0;
  std::vector<int64_t> sample_ids;  // dataset indices of the B samples
};

// Produces the batches of epochs 0, 1, 2, ... in order, without end. A producer thread prepares
// batches ahead in pinned host memory (`prefetch` beyond the two the consumer holds), so the
// host-to-device copy of a batch can be asynchronous and overlap with training on the previous
// one. The consumer holds the last two batches it was given, so it can take the next batch while
// the copy of the one before is still queued. One consumer thread calls next() and seek().
class BatchLoader {
 public:
  // `data` must outlive the loader.
  BatchLoader(const Dataset& data, const LoaderOptions& opts);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  int64_t batches_per_epoch() const { return batches_per_epoch_; }

  // The next batch. It (and the memory its tensors view) stays valid until the second
  // following next(), or the next seek(): a copy of it may still be pending while the consumer
  // takes the batch after it. Rethrows an error of the producer thread.
  const Batch& next();

  // Makes the next call to next() return batch `batch_index` of epoch `epoch` (to resume a run).
  void seek(int64_t epoch, int64_t batch_index);

 private:
  struct Slot {
    PinnedBuffer memory;  // images, then labels
    Batch batch;
  };
  void produce();
  void release_held_locked();

  const Dataset& data_;
  const LoaderOptions opts_;
  const int64_t batches_per_epoch_;
  int64_t slot_batch_ = 0;  // the largest batch a slot holds: the batch size, at most the data set
  std::vector<Slot> slots_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> free_slots_;
  std::deque<int> ready_;                          // filled slots, in batch order
  static constexpr size_t kHeld = 2;               // batches the consumer holds
  std::deque<int> held_;                           // the slots it was last given, oldest first
  int64_t produce_epoch_ = 0, produce_index_ = 0;  // the next batch the producer prepares
  uint64_t generation_ = 0;                        // advanced by seek(); a fill started earlier is discarded
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread producer_;
};

}  // namespace sp::data
