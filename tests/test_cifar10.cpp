// CIFAR-10 reading, normalisation, augmentation and the batch loader, on generated files and
// in-memory data sets; plus checks of the real data set when it has been fetched.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common/error.h"
#include "tests/error_testing.h"
#include "tests/source_dir.h"
#include "tests/temp_dir.h"
#include "tools/cifar10.h"

using namespace sp;
using namespace sp::data;
using sp::test::expect_error;
using sp::test::TempDir;
using sp::test::write_bytes;
namespace fs = std::filesystem;

namespace {

// The generated contents of record r of file `file_id`: a label and a pixel value per
// (channel, pixel index in the plane), distinct enough to catch any mix-up.
int gen_label(int file_id, int64_t r) { return int((r * 3 + file_id) % 10); }
uint8_t gen_pixel(int file_id, int64_t r, int c, int64_t i) {
  return uint8_t((r * 31 + c * 101 + i * 7 + file_id * 13) & 0xFF);
}

std::vector<uint8_t> gen_batch_bytes(int file_id) {
  std::vector<uint8_t> bytes(static_cast<size_t>(kCifarRecordsPerFile * kCifarRecordBytes));
  for (int64_t r = 0; r < kCifarRecordsPerFile; ++r) {
    uint8_t* rec = bytes.data() + r * kCifarRecordBytes;
    rec[0] = uint8_t(gen_label(file_id, r));
    for (int c = 0; c < 3; ++c)
      for (int64_t i = 0; i < 1024; ++i) rec[1 + c * 1024 + i] = gen_pixel(file_id, r, c, i);
  }
  return bytes;
}

// Writes all six files; file k of the order data_batch_1..5, test_batch has file_id k.
void write_all_files(const TempDir& dir) {
  std::vector<std::string> names = cifar10_file_names(Split::Train);
  names.push_back("test_batch.bin");
  for (size_t k = 0; k < names.size(); ++k) write_bytes(dir.file(names[k]), gen_batch_bytes(int(k)));
}

float normalized(uint8_t p, int c, const Normalization& n = kCifar10Normalization) {
  return (float(p) / 255.f - n.mean[size_t(c)]) / n.std[size_t(c)];
}

// Restores an environment variable when the test ends.
struct EnvGuard {
  std::string name;
  bool had;
  std::string old;
  explicit EnvGuard(const char* n) : name(n), had(std::getenv(n) != nullptr), old(had ? std::getenv(n) : "") {}
  ~EnvGuard() {
    if (had)
      ::setenv(name.c_str(), old.c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};

// A random in-memory data set with label = index % 10.
Dataset random_dataset(int64_t n, uint64_t seed) {
  Dataset d;
  std::mt19937_64 rng(seed);
  d.images.resize(size_t(n * kCifarImageBytes));
  for (uint8_t& p : d.images) p = uint8_t(rng());
  for (int64_t i = 0; i < n; ++i) d.labels.push_back(int32_t(i % 10));
  return d;
}

// A copy of a batch, to compare batches across next() calls and loaders.
struct BatchCopy {
  std::vector<float> images;
  std::vector<int32_t> labels;
  std::vector<int64_t> ids;
  int64_t epoch, index;
  bool operator==(const BatchCopy& o) const {
    return images == o.images && labels == o.labels && ids == o.ids && epoch == o.epoch && index == o.index;
  }
};

BatchCopy copy_of(const Batch& b) {
  BatchCopy c;
  const float* img = b.images.data<float>();
  c.images.assign(img, img + b.images.numel());
  const int32_t* lab = b.labels.data<int32_t>();
  c.labels.assign(lab, lab + b.labels.numel());
  c.ids = b.sample_ids;
  c.epoch = b.epoch;
  c.index = b.index_in_epoch;
  return c;
}

std::vector<BatchCopy> take(BatchLoader& loader, int count) {
  std::vector<BatchCopy> out;
  for (int i = 0; i < count; ++i) out.push_back(copy_of(loader.next()));
  return out;
}

// ---------------------------------------------------------------- reader

TEST(Cifar10Reader, DecodesPlanarRecordsToNhwc) {
  TempDir dir;
  write_bytes(dir.file("b.bin"), gen_batch_bytes(3));
  const Dataset d = read_cifar10_batch_file(dir.file("b.bin"));
  ASSERT_EQ(d.size(), 10000);
  ASSERT_EQ(d.images.size(), size_t(10000 * 3072));
  for (int64_t r = 0; r < d.size(); ++r) ASSERT_EQ(d.labels[size_t(r)], gen_label(3, r)) << "record " << r;
  for (int64_t r : {0, 1, 4999, 9999})
    for (int64_t i = 0; i < 1024; ++i)
      for (int c = 0; c < 3; ++c)
        ASSERT_EQ(d.images[size_t(r * 3072 + i * 3 + c)], gen_pixel(3, r, c, i)) << r << " " << i << " " << c;
  // By hand: pixel (y=1, x=2) is plane index 34; its green value is byte 1 + 1024 + 34 of the record.
  const std::vector<uint8_t> raw = gen_batch_bytes(3);
  EXPECT_EQ(d.images[size_t(7 * 3072 + (1 * 32 + 2) * 3 + 1)], raw[size_t(7 * 3073 + 1 + 1024 + 34)]);
}

TEST(Cifar10Reader, RejectsBadFilesNamingThem) {
  TempDir dir;
  std::vector<uint8_t> bytes = gen_batch_bytes(0);

  const std::string missing = dir.file("missing.bin");
  expect_error([&] { read_cifar10_batch_file(missing); }, {missing, "cannot open"});

  const std::string truncated = dir.file("truncated.bin");
  write_bytes(truncated, std::vector<uint8_t>(bytes.begin(), bytes.end() - 1));
  expect_error([&] { read_cifar10_batch_file(truncated); }, {truncated, "30729999 bytes", "expected 30730000"});

  const std::string oversized = dir.file("oversized.bin");
  std::vector<uint8_t> longer = bytes;
  longer.push_back(0);
  write_bytes(oversized, longer);
  expect_error([&] { read_cifar10_batch_file(oversized); }, {oversized, "30730001 bytes", "expected 30730000"});

  // Empty, and cut at a record's boundary (whole records, but too few).
  const std::string empty = dir.file("empty.bin");
  write_bytes(empty, {});
  expect_error([&] { read_cifar10_batch_file(empty); }, {empty, "0 bytes", "expected 30730000"});
  const std::string short_by_a_record = dir.file("short_by_a_record.bin");
  write_bytes(short_by_a_record, std::vector<uint8_t>(bytes.begin(), bytes.end() - 3073));
  expect_error([&] { read_cifar10_batch_file(short_by_a_record); },
               {short_by_a_record, "30726927 bytes", "expected 30730000"});

  // Labels just past 9 and at the byte's top, in the first, a middle and the last record.
  for (const auto& [record, label] : {std::pair<int, int>{0, 255}, {1234, 10}, {9999, 128}}) {
    std::vector<uint8_t> bad = bytes;
    bad[size_t(record * 3073)] = uint8_t(label);
    const std::string bad_label = dir.file("bad_label.bin");
    write_bytes(bad_label, bad);
    expect_error([&] { read_cifar10_batch_file(bad_label); },
                 {bad_label, "record " + std::to_string(record), "label " + std::to_string(label)});
  }
}

TEST(Cifar10Reader, LoadsSplitsInFileOrderWithLimit) {
  TempDir dir;
  write_all_files(dir);
  const Dataset train = load_cifar10(dir.path.string(), Split::Train);
  ASSERT_EQ(train.size(), 50000);
  ASSERT_EQ(train.images.size(), size_t(50000 * 3072));
  for (int64_t k = 0; k < 5; ++k) {  // first and last record of each file, in file order
    EXPECT_EQ(train.labels[size_t(k * 10000)], gen_label(int(k), 0));
    EXPECT_EQ(train.labels[size_t(k * 10000 + 9999)], gen_label(int(k), 9999));
    EXPECT_EQ(train.images[size_t((k * 10000 + 9999) * 3072 + 5)], gen_pixel(int(k), 9999, 2, 1));
  }
  const Dataset test = load_cifar10(dir.path.string(), Split::Test);
  ASSERT_EQ(test.size(), 10000);
  EXPECT_EQ(test.labels[17], gen_label(5, 17));

  const Dataset some = load_cifar10(dir.path.string(), Split::Train, 10001);
  ASSERT_EQ(some.size(), 10001);
  ASSERT_EQ(some.images.size(), size_t(10001 * 3072));
  EXPECT_EQ(some.labels[10000], gen_label(1, 0));
  EXPECT_EQ(load_cifar10(dir.path.string(), Split::Test, 5).size(), 5);
  EXPECT_EQ(load_cifar10(dir.path.string(), Split::Test, 20000).size(), 10000);

  std::filesystem::remove(dir.file("data_batch_2.bin"));
  expect_error([&] { load_cifar10(dir.path.string(), Split::Train); }, {"data_batch_2.bin", "cannot open"});
  EXPECT_EQ(load_cifar10(dir.path.string(), Split::Train, 100).size(), 100);  // only data_batch_1 is read
}

TEST(Cifar10Reader, ResolvesDataDirectory) {
  EnvGuard env("CIFAR10_DIR");
  TempDir with_files, empty;
  for (Split s : {Split::Train, Split::Test})
    for (const std::string& name : cifar10_file_names(s)) write_bytes(with_files.file(name), {0});

  ::unsetenv("CIFAR10_DIR");
  EXPECT_EQ(resolve_cifar10_dir(with_files.path.string()), with_files.path.string());
  ::setenv("CIFAR10_DIR", with_files.path.c_str(), 1);
  EXPECT_EQ(resolve_cifar10_dir(""), with_files.path.string());
  // The flag wins over the environment.
  expect_error([&] { resolve_cifar10_dir(empty.path.string()); },
               {empty.path.string(), "data_batch_1.bin", "test_batch.bin", "tools/fetch_cifar10.sh"});
  ::setenv("CIFAR10_DIR", empty.path.c_str(), 1);
  expect_error([&] { resolve_cifar10_dir(""); }, {empty.path.string(), "$CIFAR10_DIR", "tools/fetch_cifar10.sh"});
  // A file given for the directory is named as such (the fetch hint would have fetched into it).
  const std::string file = with_files.file("data_batch_1.bin");
  expect_error([&] { resolve_cifar10_dir(file); }, {file, "is a file, not a directory"});
  // A directory in a data file's place is named as such, not as missing.
  fs::create_directory(empty.path / "test_batch.bin");
  expect_error([&] { resolve_cifar10_dir(empty.path.string()); },
               {(empty.path / "test_batch.bin").string(), "is not a regular file"});
  fs::remove(empty.path / "test_batch.bin");

  // The default is relative to the working directory.
  ::unsetenv("CIFAR10_DIR");
  const fs::path cwd = fs::current_path();
  fs::current_path(empty.path);
  expect_error([&] { resolve_cifar10_dir(""); }, {"./data/cifar-10-batches-bin", "tools/fetch_cifar10.sh"});
  fs::create_directories(empty.path / "data");
  fs::create_directory_symlink(with_files.path, empty.path / "data" / "cifar-10-batches-bin");
  EXPECT_EQ(resolve_cifar10_dir(""), "./data/cifar-10-batches-bin");
  fs::current_path(cwd);
}

// Evaluation reads only the test batch: a directory holding just that serves it, and is refused
// for training, naming the five files it lacks (and not the one it has).
TEST(Cifar10Reader, ResolvesADirectoryForTheSplitsNeeded) {
  EnvGuard env("CIFAR10_DIR");
  ::unsetenv("CIFAR10_DIR");
  TempDir test_only;
  for (const std::string& name : cifar10_file_names(Split::Test)) write_bytes(test_only.file(name), {0});
  EXPECT_EQ(resolve_cifar10_dir(test_only.path.string(), {Split::Test}), test_only.path.string());
  expect_error([&] { resolve_cifar10_dir(test_only.path.string()); },
               {"missing data_batch_1.bin, data_batch_2.bin, data_batch_3.bin, data_batch_4.bin, data_batch_5.bin."});
  try {
    resolve_cifar10_dir(test_only.path.string());
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find("test_batch.bin"), std::string::npos) << e.what();
  }
  expect_error([&] { resolve_cifar10_dir(test_only.path.string(), {Split::Train}); }, {"data_batch_5.bin"});
}

TEST(Cifar10Reader, DigestTellsDataSetsApart) {
  const Dataset d = random_dataset(300, 1);
  const std::string h = digest(d);
  EXPECT_EQ(h.size(), 16u);
  EXPECT_EQ(h.find_first_not_of("0123456789abcdef"), std::string::npos) << h;
  EXPECT_EQ(digest(random_dataset(300, 1)), h);
  std::set<std::string> seen{h};
  // Any one pixel, any one label, the order, the size: each gives another digest.
  for (size_t at : {size_t(0), size_t(3071), size_t(12345), d.images.size() - 1}) {
    Dataset e = d;
    e.images[at] ^= 1;
    EXPECT_TRUE(seen.insert(digest(e)).second) << "pixel byte " << at;
  }
  for (size_t at : {size_t(0), size_t(299)}) {
    Dataset e = d;
    e.labels[at] = (e.labels[at] + 1) % 10;
    EXPECT_TRUE(seen.insert(digest(e)).second) << "label " << at;
  }
  // Two changes that cancel where a word's bits only carry upwards (a multiply alone): +128 in
  // the top byte of two words.
  Dataset pair = d;
  pair.images[7] += 128, pair.images[8 * 37 + 7] += 128;
  EXPECT_TRUE(seen.insert(digest(pair)).second) << "two top-byte changes";
  Dataset swapped = d;
  std::swap_ranges(swapped.images.begin(), swapped.images.begin() + kCifarImageBytes,
                   swapped.images.begin() + kCifarImageBytes);
  std::swap(swapped.labels[0], swapped.labels[1]);
  EXPECT_TRUE(seen.insert(digest(swapped)).second) << "two samples swapped";
  Dataset shorter = d;
  shorter.images.resize(shorter.images.size() - size_t(kCifarImageBytes));
  shorter.labels.pop_back();
  EXPECT_TRUE(seen.insert(digest(shorter)).second) << "one sample fewer";
  EXPECT_EQ(digest(Dataset{}).size(), 16u);
}

// ---------------------------------------------------------------- normalisation, augmentation

TEST(Cifar10Normalization, ConstantsAndComputedStatistics) {
  EXPECT_FLOAT_EQ(kCifar10Normalization.mean[0], 0.4914f);
  EXPECT_FLOAT_EQ(kCifar10Normalization.mean[1], 0.4822f);
  EXPECT_FLOAT_EQ(kCifar10Normalization.mean[2], 0.4465f);
  EXPECT_FLOAT_EQ(kCifar10Normalization.std[0], 0.2470f);
  EXPECT_FLOAT_EQ(kCifar10Normalization.std[1], 0.2435f);
  EXPECT_FLOAT_EQ(kCifar10Normalization.std[2], 0.2616f);

  // Red all 255; green 0 and 255 in equal numbers; blue all 51 (= 0.2 * 255).
  Dataset d;
  d.labels = {0, 1};
  d.images.resize(2 * 3072);
  for (int64_t i = 0; i < 2 * 1024; ++i) {
    d.images[size_t(i * 3)] = 255;
    d.images[size_t(i * 3 + 1)] = i % 2 ? 255 : 0;
    d.images[size_t(i * 3 + 2)] = 51;
  }
  const Normalization n = compute_normalization(d);
  EXPECT_NEAR(n.mean[0], 1.0, 1e-6);
  EXPECT_NEAR(n.std[0], 0.0, 1e-3);
  EXPECT_NEAR(n.mean[1], 0.5, 1e-6);
  EXPECT_NEAR(n.std[1], 0.5, 1e-6);
  EXPECT_NEAR(n.mean[2], 0.2, 1e-6);
  EXPECT_NEAR(n.std[2], 0.0, 1e-3);
}

TEST(Cifar10Augment, IdentityNormalizesEveryPixel) {
  std::vector<uint8_t> img(3072);
  for (size_t i = 0; i < img.size(); ++i) img[i] = uint8_t(i * 37 % 256);
  std::vector<float> out(3072);
  augment_normalize(img.data(), Augmentation{}, kCifar10Normalization, out.data());
  for (size_t i = 0; i < img.size(); ++i) ASSERT_NEAR(out[i], normalized(img[i], int(i % 3)), 1e-5) << i;
  // Extremes by hand: 0 -> -mean/std, 255 -> (1 - mean)/std.
  img[0] = 0, img[1] = 255;
  augment_normalize(img.data(), Augmentation{}, kCifar10Normalization, out.data());
  EXPECT_NEAR(out[0], -0.4914f / 0.2470f, 1e-5);
  EXPECT_NEAR(out[1], (1 - 0.4822f) / 0.2435f, 1e-5);
}

TEST(Cifar10Augment, CropAndFlipMatchPaddedReference) {
  // Pixel (y, x, c) of the test image; all values distinct per channel position.
  auto value = [](int y, int x, int c) { return uint8_t((y * 32 + x) % 200 + c * 20 + 1); };
  std::vector<uint8_t> img(3072);
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 32; ++x)
      for (int c = 0; c < 3; ++c) img[size_t((y * 32 + x) * 3 + c)] = value(y, x, c);
  const auto& nm = kCifar10Normalization;
  std::vector<float> out(3072);
  auto at = [&](int y, int x, int c) { return out[size_t((y * 32 + x) * 3 + c)]; };

  // Hand-computed spots. Crop from the top-right corner of the padded 40x40 image (row 0,
  // column 8): output row y shows image row y - 4, output column x image column x + 4.
  augment_normalize(img.data(), Augmentation{0, 8, false}, nm, out.data());
  EXPECT_NEAR(at(0, 0, 0), normalized(0, 0), 1e-5);   // padding
  EXPECT_NEAR(at(3, 10, 2), normalized(0, 2), 1e-5);  // padding rows 0-3
  EXPECT_NEAR(at(4, 0, 1), normalized(value(0, 4, 1), 1), 1e-5);
  EXPECT_NEAR(at(4, 27, 0), normalized(value(0, 31, 0), 0), 1e-5);
  EXPECT_NEAR(at(4, 28, 0), normalized(0, 0), 1e-5);  // padding columns 28-31
  EXPECT_NEAR(at(31, 27, 2), normalized(value(27, 31, 2), 2), 1e-5);
  // The same crop mirrored: output column x shows crop column 31 - x.
  augment_normalize(img.data(), Augmentation{0, 8, true}, nm, out.data());
  EXPECT_NEAR(at(4, 31, 1), normalized(value(0, 4, 1), 1), 1e-5);
  EXPECT_NEAR(at(4, 4, 0), normalized(value(0, 31, 0), 0), 1e-5);
  EXPECT_NEAR(at(4, 3, 0), normalized(0, 0), 1e-5);
  EXPECT_NEAR(at(10, 0, 0), normalized(0, 0), 1e-5);

  // Every crop offset, both flips, against pad-then-crop-then-flip spelled out literally.
  std::vector<uint8_t> padded(40 * 40 * 3, 0);
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 32; ++x)
      for (int c = 0; c < 3; ++c) padded[size_t(((y + 4) * 40 + x + 4) * 3 + c)] = value(y, x, c);
  for (int cy = 0; cy <= 8; ++cy)
    for (int cx = 0; cx <= 8; ++cx)
      for (bool flip : {false, true}) {
        augment_normalize(img.data(), Augmentation{cy, cx, flip}, nm, out.data());
        for (int y = 0; y < 32; ++y)
          for (int x = 0; x < 32; ++x) {
            const int crop_col = flip ? 31 - x : x;
            for (int c = 0; c < 3; ++c) {
              const uint8_t p = padded[size_t(((cy + y) * 40 + cx + crop_col) * 3 + c)];
              ASSERT_NEAR(at(y, x, c), normalized(p, c), 1e-5)
                  << cy << " " << cx << " " << flip << " " << y << " " << x;
            }
          }
      }
  EXPECT_THROW(augment_normalize(img.data(), Augmentation{9, 0, false}, nm, out.data()), Error);
}

TEST(Cifar10Augment, SampledParametersCoverThePaddingUniformly) {
  std::vector<int> ys(9), xs(9);
  int flips = 0, same_as_epoch1 = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const Augmentation a = sample_augmentation(7, 0, i);
    ASSERT_TRUE(a.crop_y >= 0 && a.crop_y <= 8 && a.crop_x >= 0 && a.crop_x <= 8) << a.crop_y << " " << a.crop_x;
    ++ys[size_t(a.crop_y)], ++xs[size_t(a.crop_x)], flips += a.flip;
    const Augmentation again = sample_augmentation(7, 0, i);
    ASSERT_TRUE(again.crop_y == a.crop_y && again.crop_x == a.crop_x && again.flip == a.flip);
    const Augmentation other = sample_augmentation(7, 1, i);
    same_as_epoch1 += other.crop_y == a.crop_y && other.crop_x == a.crop_x && other.flip == a.flip;
  }
  for (int v = 0; v < 9; ++v) {  // expected n / 9 = 2222 each
    EXPECT_NEAR(ys[size_t(v)], n / 9, 200) << v;
    EXPECT_NEAR(xs[size_t(v)], n / 9, 200) << v;
  }
  EXPECT_NEAR(flips, n / 2, 400);
  EXPECT_LT(same_as_epoch1, n / 50);  // chance agreement is 1/162
}

TEST(Cifar10Augment, CutoutZeroesTheClippedSquareAfterNormalisation) {
  std::vector<uint8_t> img(3072);
  for (size_t i = 0; i < img.size(); ++i) img[i] = uint8_t(i * 7 % 251 + 1);
  const auto& nm = kCifar10Normalization;
  std::vector<float> plain(3072), cut(3072);
  // Every side (odd and even) and centre, against the square spelled out: rows and columns
  // centre - side / 2 .. centre - side / 2 + side - 1, clipped; everything else as without it.
  for (int side : {1, 8, 16, 17, 32})
    for (int cy : {0, 5, 16, 31})
      for (int cx : {0, 2, 15, 31}) {
        Augmentation a{2, 6, true};
        augment_normalize(img.data(), a, nm, plain.data());
        a.cutout = side, a.cutout_y = cy, a.cutout_x = cx;
        augment_normalize(img.data(), a, nm, cut.data());
        int zeroed = 0;
        for (int y = 0; y < 32; ++y)
          for (int x = 0; x < 32; ++x) {
            const bool inside =
                y >= cy - side / 2 && y < cy - side / 2 + side && x >= cx - side / 2 && x < cx - side / 2 + side;
            for (int c = 0; c < 3; ++c) {
              const size_t i = size_t((y * 32 + x) * 3 + c);
              ASSERT_EQ(cut[i], inside ? 0.f : plain[i]) << side << " at " << cy << "," << cx << ": " << y << " " << x;
              zeroed += cut[i] == 0.f;
            }
          }
        const int rows = std::min(32, cy - side / 2 + side) - std::max(0, cy - side / 2);
        const int cols = std::min(32, cx - side / 2 + side) - std::max(0, cx - side / 2);
        EXPECT_EQ(zeroed, 3 * rows * cols) << "values zeroed in the output: the clipped square's, no other";
      }
  Augmentation bad{4, 4, false};
  bad.cutout = 33;
  EXPECT_THROW(augment_normalize(img.data(), bad, nm, cut.data()), Error);
  bad.cutout = 8, bad.cutout_y = 32;
  EXPECT_THROW(augment_normalize(img.data(), bad, nm, cut.data()), Error);
}

TEST(Cifar10Augment, CutoutCentresAreUniformAndLeaveTheCropAndFlipAlone) {
  std::vector<int> ys(32), xs(32);
  const int n = 32000;
  for (int i = 0; i < n; ++i) {
    const Augmentation a = sample_augmentation(3, 2, i, 16), b = sample_augmentation(3, 2, i);
    ASSERT_EQ(a.cutout, 16);
    ASSERT_EQ(b.cutout, 0);
    ASSERT_TRUE(a.crop_y == b.crop_y && a.crop_x == b.crop_x && a.flip == b.flip) << i;
    ASSERT_TRUE(a.cutout_y >= 0 && a.cutout_y < 32 && a.cutout_x >= 0 && a.cutout_x < 32);
    ++ys[size_t(a.cutout_y)], ++xs[size_t(a.cutout_x)];
  }
  for (int v = 0; v < 32; ++v) {  // expected n / 32 = 1000 each
    EXPECT_NEAR(ys[size_t(v)], n / 32, 150) << v;
    EXPECT_NEAR(xs[size_t(v)], n / 32, 150) << v;
  }
  EXPECT_THROW(sample_augmentation(3, 2, 0, -1), Error);
  EXPECT_THROW(sample_augmentation(3, 2, 0, 33), Error);
}

// ---------------------------------------------------------------- batch loader

TEST(Cifar10Loader, EverySampleOncePerEpochInAFreshOrder) {
  const Dataset d = random_dataset(1000, 1);
  LoaderOptions o;
  o.batch_size = 64;
  o.seed = 5;
  BatchLoader loader(d, o);
  ASSERT_EQ(loader.batches_per_epoch(), 16);
  std::vector<std::vector<int64_t>> orders;
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> seen;
    for (int64_t i = 0; i < 16; ++i) {
      const Batch& b = loader.next();
      ASSERT_EQ(b.epoch, epoch);
      ASSERT_EQ(b.index_in_epoch, i);
      const int64_t B = i < 15 ? 64 : 1000 - 15 * 64;  // 40 in the last batch
      ASSERT_EQ(b.images.shape(), (Shape{B, 32, 32, 3}));
      ASSERT_EQ(b.images.dtype(), DType::F32);
      ASSERT_EQ(b.labels.shape(), (Shape{B}));
      ASSERT_EQ(b.labels.dtype(), DType::I32);
      ASSERT_EQ(int64_t(b.sample_ids.size()), B);
      for (int64_t j = 0; j < B; ++j) {
        const int64_t id = b.sample_ids[size_t(j)];
        ASSERT_EQ(b.labels.at<int32_t>(j), d.labels[size_t(id)]);
        // Without augmentation the image is the normalised original.
        ASSERT_NEAR(b.images.at<float>(j * 3072 + 100), normalized(d.images[size_t(id * 3072 + 100)], 100 % 3), 1e-5);
      }
      seen.insert(seen.end(), b.sample_ids.begin(), b.sample_ids.end());
    }
    std::vector<int64_t> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t k = 0; k < 1000; ++k) ASSERT_EQ(sorted[size_t(k)], k) << "epoch " << epoch;
    orders.push_back(seen);
  }
  EXPECT_NE(orders[0], orders[1]);
  EXPECT_NE(orders[1], orders[2]);
  EXPECT_EQ(orders[0], epoch_order(1000, true, 5, 0));
}

TEST(Cifar10Loader, IdentityOrderWithoutShuffleAndDropLast) {
  const Dataset d = random_dataset(1000, 2);
  LoaderOptions o;
  o.batch_size = 64;
  o.shuffle = false;
  o.drop_last = true;
  BatchLoader loader(d, o);
  ASSERT_EQ(loader.batches_per_epoch(), 15);
  for (int64_t i = 0; i < 15; ++i) {
    const Batch& b = loader.next();
    ASSERT_EQ(b.images.size(0), 64);
    for (int64_t j = 0; j < 64; ++j) ASSERT_EQ(b.sample_ids[size_t(j)], i * 64 + j);
  }
  const Batch& b = loader.next();  // samples 960-999 are dropped; epoch 1 starts again at 0
  EXPECT_EQ(b.epoch, 1);
  EXPECT_EQ(b.index_in_epoch, 0);
  EXPECT_EQ(b.sample_ids[0], 0);

  EXPECT_EQ(batches_per_epoch(1000, 64, false), 16);
  EXPECT_EQ(batches_per_epoch(1024, 64, false), 16);
  EXPECT_EQ(batches_per_epoch(1024, 64, true), 16);
}

// A batch size past the data set's makes one batch of the whole set, its slots sized by the set
// (an --eval-batch-size of 50,000,000 asked for 614 GB of pinned memory for 10,000 images).
TEST(Cifar10Loader, ABatchLargerThanTheSetIsTheWholeSet) {
  const Dataset d = random_dataset(40, 5);
  LoaderOptions o;
  o.batch_size = int64_t(1) << 40;  // its slots alone would be 12.6 PB
  o.shuffle = false;
  BatchLoader loader(d, o);
  ASSERT_EQ(loader.batches_per_epoch(), 1);
  for (int epoch = 0; epoch < 2; ++epoch) {
    const Batch& b = loader.next();
    ASSERT_EQ(b.images.size(0), 40);
    ASSERT_EQ(b.labels.size(0), 40);
    for (int64_t j = 0; j < 40; ++j) {
      ASSERT_EQ(b.sample_ids[size_t(j)], j);
      ASSERT_EQ(b.labels.data<int32_t>()[j], d.labels[size_t(j)]) << "the labels after the slot's images";
    }
  }
  // The largest batch size there is: one batch (n + batch - 1 overflowed to none).
  EXPECT_EQ(batches_per_epoch(10000, std::numeric_limits<int64_t>::max(), false), 1);
  EXPECT_EQ(batches_per_epoch(10000, std::numeric_limits<int64_t>::max(), true), 0);
}

TEST(Cifar10Loader, SameSeedSameBatchesAndMatchesSynchronousReference) {
  const Dataset d = random_dataset(500, 3);
  LoaderOptions o;
  o.batch_size = 48;
  o.augment = true;
  o.seed = 11;
  o.prefetch = 3;
  BatchLoader a(d, o);
  const std::vector<BatchCopy> got = take(a, 35);  // 11 batches per epoch: crosses three epochs

  // The reference, built one batch at a time on this thread.
  for (const BatchCopy& g : got) {
    const std::vector<int64_t> order = epoch_order(d.size(), true, o.seed, g.epoch);
    const int64_t B = int64_t(g.labels.size());
    std::vector<float> images(static_cast<size_t>(B * 3072));
    std::vector<int32_t> labels(static_cast<size_t>(B));
    std::vector<int64_t> ids(static_cast<size_t>(B));
    fill_batch(d, order, o, g.epoch, g.index, images.data(), labels.data(), ids.data());
    ASSERT_EQ(images, g.images) << g.epoch << "/" << g.index;
    ASSERT_EQ(labels, g.labels);
    ASSERT_EQ(ids, g.ids);
  }

  // Another loader with the same seed and a different prefetch depth sees the same batches.
  LoaderOptions o1 = o;
  o1.prefetch = 1;
  BatchLoader b(d, o1);
  EXPECT_TRUE(take(b, 35) == got);

  LoaderOptions o2 = o;
  o2.seed = 12;
  BatchLoader c(d, o2);
  const std::vector<BatchCopy> other = take(c, 1);
  EXPECT_NE(other[0].ids, got[0].ids);
}

// A batch stays valid until the second following next(): the trainers take the next batch while
// the copy of the one before may still be queued. The producer is given time to fill every slot
// it may: with one batch held, as before, it overwrote the first batch at once (checked).
TEST(Cifar10Loader, ABatchStaysValidUntilTheSecondFollowingNext) {
  const Dataset d = random_dataset(200, 8);
  LoaderOptions o;
  o.batch_size = 16;
  o.augment = true;
  o.seed = 5;
  for (int prefetch : {1, 3}) {
    o.prefetch = prefetch;
    BatchLoader ref_loader(d, o);
    const std::vector<BatchCopy> ref = take(ref_loader, 8);
    BatchLoader loader(d, o);
    const Batch* older = &loader.next();
    for (int i = 1; i < 8; ++i) {
      const Batch* newer = &loader.next();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the producer runs ahead
      ASSERT_TRUE(copy_of(*older) == ref[size_t(i - 1)]) << "batch " << i - 1 << ", prefetch " << prefetch;
      ASSERT_TRUE(copy_of(*newer) == ref[size_t(i)]) << "batch " << i << ", prefetch " << prefetch;
      ASSERT_NE(older->images.raw_data(), newer->images.raw_data());
      older = newer;
    }
  }
}

TEST(Cifar10Loader, AugmentationChangesImagesButNotLabels) {
  const Dataset d = random_dataset(64, 4);
  LoaderOptions plain;
  plain.batch_size = 64;
  plain.shuffle = false;
  LoaderOptions aug = plain;
  aug.augment = true;
  BatchLoader lp(d, plain), la(d, aug);
  const BatchCopy p = copy_of(lp.next()), a = copy_of(la.next());
  EXPECT_EQ(p.labels, a.labels);
  EXPECT_EQ(p.ids, a.ids);
  // Each image is its own with the augmentation drawn for its position; the plain loader's is the
  // identity augmentation (crop at the padding, no flip).
  int changed = 0;
  std::vector<float> want(3072);
  for (int64_t j = 0; j < 64; ++j) {
    const uint8_t* src = d.images.data() + a.ids[size_t(j)] * 3072;
    augment_normalize(src, sample_augmentation(aug.seed, 0, j), aug.norm, want.data());
    ASSERT_TRUE(std::equal(want.begin(), want.end(), a.images.begin() + j * 3072)) << j;
    augment_normalize(src, Augmentation{}, plain.norm, want.data());
    ASSERT_TRUE(std::equal(want.begin(), want.end(), p.images.begin() + j * 3072)) << j;
    changed += !std::equal(p.images.begin() + j * 3072, p.images.begin() + (j + 1) * 3072, a.images.begin() + j * 3072);
  }
  EXPECT_GT(changed, 50);

  // With cutout, each image is the augmented one with its square zeroed.
  LoaderOptions cut = aug;
  cut.cutout = 12;
  BatchLoader lc(d, cut);
  const BatchCopy c = copy_of(lc.next());
  EXPECT_EQ(c.ids, a.ids);
  for (int64_t j = 0; j < 64; ++j) {
    augment_normalize(d.images.data() + c.ids[size_t(j)] * 3072, sample_augmentation(cut.seed, 0, j, 12),
                      cut.norm, want.data());
    ASSERT_TRUE(std::equal(want.begin(), want.end(), c.images.begin() + j * 3072)) << j;
    int zeros = 0;
    for (int64_t i = 0; i < 3072; ++i) zeros += c.images[size_t(j * 3072 + i)] == 0.f;
    EXPECT_GE(zeros, 6 * 6 * 3) << j;  // a 12 x 12 square keeps at least a 6 x 6 corner inside
  }
}

TEST(Cifar10Loader, SeekResumesTheExactSequence) {
  const Dataset d = random_dataset(300, 5);
  LoaderOptions o;
  o.batch_size = 32;  // 10 batches per epoch, the last of 12
  o.augment = true;
  o.seed = 99;
  BatchLoader full(d, o);
  const std::vector<BatchCopy> ref = take(full, 30);

  // A new loader resumed at epoch 1, batch 7.
  BatchLoader resumed(d, o);
  resumed.seek(1, 7);
  const std::vector<BatchCopy> tail = take(resumed, 13);
  for (size_t k = 0; k < tail.size(); ++k) ASSERT_TRUE(tail[k] == ref[17 + k]) << k;

  // Seeking a loader in use discards what it had prefetched, backwards and forwards.
  BatchLoader used(d, o);
  take(used, 5);
  used.seek(0, 2);
  ASSERT_TRUE(copy_of(used.next()) == ref[2]);
  used.seek(2, 9);
  ASSERT_TRUE(copy_of(used.next()) == ref[29]);
  ASSERT_EQ(used.next().epoch, 3);

  EXPECT_THROW(used.seek(0, 10), Error);
  EXPECT_THROW(used.seek(-1, 0), Error);
}

TEST(Cifar10Loader, RejectsBadOptions) {
  const Dataset d = random_dataset(10, 6);
  LoaderOptions o;
  o.batch_size = 0;
  EXPECT_THROW(BatchLoader(d, o), Error);
  o.batch_size = 16;
  o.drop_last = true;  // 10 samples make no full batch of 16
  EXPECT_THROW(BatchLoader(d, o), Error);
  o.drop_last = false;
  o.prefetch = 0;
  EXPECT_THROW(BatchLoader(d, o), Error);
  o.prefetch = 2;
  BatchLoader ok(d, o);
  EXPECT_EQ(ok.next().images.size(0), 10);
}

// ---------------------------------------------------------------- the real data set

TEST(Cifar10RealData, SizesLabelsAndStatistics) {
  const std::string dir = test::real_cifar10_dir();
  if (dir.empty()) GTEST_SKIP() << test::no_cifar10_reason();
  const Dataset train = load_cifar10(dir, Split::Train), test = load_cifar10(dir, Split::Test);
  ASSERT_EQ(train.size(), 50000);
  ASSERT_EQ(test.size(), 10000);
  std::vector<int> train_hist(10), test_hist(10);
  for (int32_t l : train.labels) ++train_hist[size_t(l)];
  for (int32_t l : test.labels) ++test_hist[size_t(l)];
  for (int c = 0; c < 10; ++c) {
    EXPECT_EQ(train_hist[size_t(c)], 5000) << "class " << c;
    EXPECT_EQ(test_hist[size_t(c)], 1000) << "class " << c;
  }
  // The JPEG-compressed copy of this project's machines moves the statistics by up to ~0.002.
  const Normalization n = compute_normalization(train);
  for (size_t c = 0; c < 3; ++c) {
    EXPECT_NEAR(n.mean[c], kCifar10Normalization.mean[c], 0.005) << "channel " << c;
    EXPECT_NEAR(n.std[c], kCifar10Normalization.std[c], 0.005) << "channel " << c;
  }
}

}  // namespace
