// safetensors checkpoints: round trips, the exact bytes of a small file, files laid out by other
// writers, rejection of corrupt files (named ones, and every truncation and byte corruption of a
// valid file's header), atomic replacement, and the sp::Tensor helpers.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "engine/safetensors.h"
#include "kernels/common/error.h"
#include "tests/error_testing.h"
#include "tests/temp_dir.h"

using namespace sp;
using namespace sp::io;
using sp::test::expect_error;
using sp::test::TempDir;
using sp::test::write_bytes;
namespace fs = std::filesystem;

namespace {

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::vector<uint8_t> bytes(fs::file_size(path));
  std::FILE* f = std::fopen(path.c_str(), "rb");
  EXPECT_NE(f, nullptr);
  EXPECT_EQ(std::fread(bytes.data(), 1, bytes.size(), f), bytes.size());
  std::fclose(f);
  return bytes;
}

// A file as a foreign writer might lay it out: length prefix, header text as given, data.
std::vector<uint8_t> raw_file(const std::string& header, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> bytes(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) bytes[size_t(i)] = uint8_t(uint64_t(header.size()) >> (8 * i));
  std::copy(header.begin(), header.end(), bytes.begin() + 8);
  std::copy(data.begin(), data.end(), bytes.begin() + 8 + std::ptrdiff_t(header.size()));
  return bytes;
}

TensorRecord record(const std::string& name, const std::string& dtype, std::vector<int64_t> shape, size_t bytes) {
  TensorRecord r{name, dtype, std::move(shape), std::vector<uint8_t>(bytes)};
  for (size_t i = 0; i < bytes; ++i) r.data[i] = uint8_t(i * 13 + name.size());
  return r;
}

void expect_same(const TensorRecord& a, const TensorRecord& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_EQ(a.data, b.data);
}

TEST(Safetensors, RoundTripsDtypesShapesAndMetadata) {
  TempDir dir;
  const std::vector<TensorRecord> tensors = {record("conv1.weight", "F32", {2, 3}, 24),
                                             record("bn.gamma", "BF16", {4}, 8),
                                             record("counts", "I32", {3}, 12),
                                             record("mask", "U8", {5}, 5),
                                             record("half", "F16", {2}, 4),
                                             record("steps", "I64", {2}, 16),
                                             record("lr", "F64", {1}, 8),
                                             record("scalar", "F32", {}, 4),
                                             record("empty", "F32", {0, 3}, 0),
                                             record("layer.0/ünï \"q\"", "U8", {1, 1, 2}, 2)};
  const std::map<std::string, std::string> metadata = {
      {"epoch", "3"},
      {"quote\"back\\slash\nnewline", "tab\tctrl\x01\x1f end"},
      {"unicode", "ünïcödé \xF0\x9F\x99\x82"},  // U+1F642, four bytes of UTF-8
      {"empty", ""}};
  const std::string path = dir.file("ckpt.safetensors");
  write_safetensors(path, tensors, metadata);
  const SafetensorsFile f = read_safetensors(path);
  EXPECT_EQ(f.metadata, metadata);
  ASSERT_EQ(f.tensors.size(), tensors.size());
  for (const TensorRecord& t : tensors) {
    ASSERT_NE(f.find(t.name), nullptr) << t.name;
    expect_same(*f.find(t.name), t);
  }
  // The reader lists them in the order of their data (contiguous, it checks): largest element
  // first, so that every tensor starts at a multiple of its element size.
  size_t offset = 0;
  for (size_t i = 0; i < f.tensors.size(); ++i) {
    const size_t elem = safetensors_dtype_size(f.tensors[i].dtype);
    if (i > 0) {
      EXPECT_LE(elem, safetensors_dtype_size(f.tensors[i - 1].dtype)) << f.tensors[i].name;
    }
    EXPECT_EQ(offset % elem, 0u) << f.tensors[i].name << " at " << offset;
    offset += f.tensors[i].data.size();
  }
  EXPECT_EQ(f.tensors[0].name, "steps") << "the first 8-byte tensor written";
  ASSERT_NE(f.find("scalar"), nullptr);
  EXPECT_EQ(f.find("scalar")->shape, std::vector<int64_t>{});
  EXPECT_EQ(f.find("scalar")->data.size(), 4u);
  EXPECT_EQ(f.find("nope"), nullptr);

  // No metadata: the header has no "__metadata__" member; no tensors at all is a valid file too.
  write_safetensors(path, {tensors[0]}, {});
  const std::vector<uint8_t> bytes = read_bytes(path);
  EXPECT_EQ(std::string(bytes.begin(), bytes.end()).find("__metadata__"), std::string::npos);
  const SafetensorsFile g = read_safetensors(path);
  EXPECT_TRUE(g.metadata.empty());
  ASSERT_EQ(g.tensors.size(), 1u);
  expect_same(g.tensors[0], tensors[0]);
  write_safetensors(path, {}, {});
  EXPECT_TRUE(read_safetensors(path).tensors.empty());
}

TEST(Safetensors, ExactByteLayoutOfATinyFile) {
  TempDir dir;
  const float values[2] = {1.0f, -2.0f};
  TensorRecord a{"a", "F32", {2}, std::vector<uint8_t>(8)};
  std::memcpy(a.data.data(), values, 8);
  const std::string path = dir.file("tiny.safetensors");
  write_safetensors(path, {a}, {{"k", "v"}});

  // 79 bytes of JSON and one space of padding to 80, a multiple of 8.
  const std::string header = R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} )";
  ASSERT_EQ(header.size(), 80u);
  std::vector<uint8_t> expected = {80, 0, 0, 0, 0, 0, 0, 0};
  expected.insert(expected.end(), header.begin(), header.end());
  for (uint8_t b : {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0}) expected.push_back(b);  // 1.0f, -2.0f
  EXPECT_EQ(read_bytes(path), expected);

  // Escapes as written: quote, backslash, newline, other control characters as \u00XX. This
  // header is 40 bytes, already a multiple of 8, so it gets no padding.
  write_safetensors(path, {}, {{"q\"b\\n\n", "c\x01"}});
  const std::vector<uint8_t> bytes = read_bytes(path);
  EXPECT_EQ(std::string(bytes.begin() + 8, bytes.end()), R"({"__metadata__":{"q\"b\\n\n":"c\u0001"}})");
  EXPECT_EQ(bytes[0], 40);
}

TEST(Safetensors, ReadsOtherWritersLayouts) {
  TempDir dir;
  const std::string path = dir.file("foreign.safetensors");
  // Whitespace, metadata last, members in another order, tensors listed out of offset order,
  // \u escapes (a surrogate pair among them) and an unpadded header.
  const std::string header =
      "{\n  \"b\" : {\"data_offsets\": [4, 6], \"shape\": [2], \"dtype\": \"U8\"},\r\n"
      "\t\"a\": {\"shape\": [1], \"dtype\": \"I32\", \"data_offsets\": [0, 4]},\n"
      "  \"__metadata__\": {\"format\": \"pt\", \"smile\": \"\\ud83d\\ude42 \\u00e9\\/\"}\n}";
  write_bytes(path, raw_file(header, {1, 0, 0, 0, 7, 9}));
  const SafetensorsFile f = read_safetensors(path);
  ASSERT_EQ(f.tensors.size(), 2u);
  EXPECT_EQ(f.tensors[0].name, "a");  // in the order of the data
  EXPECT_EQ(f.tensors[0].data, (std::vector<uint8_t>{1, 0, 0, 0}));
  EXPECT_EQ(f.tensors[1].name, "b");
  EXPECT_EQ(f.tensors[1].data, (std::vector<uint8_t>{7, 9}));
  EXPECT_EQ(f.metadata.at("format"), "pt");
  EXPECT_EQ(f.metadata.at("smile"), "\xF0\x9F\x99\x82 \xC3\xA9/");
}

TEST(Safetensors, RejectsCorruptFiles) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  auto rejects = [&](const std::vector<uint8_t>& bytes, const std::string& why) {
    write_bytes(path, bytes);
    expect_error([&] { read_safetensors(path); }, {path, why});
  };
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::vector<uint8_t> eight(8, 1);
  write_bytes(path, raw_file(ok, eight));
  EXPECT_EQ(read_safetensors(path).tensors.size(), 1u);

  // Truncated files.
  std::vector<uint8_t> truncated = raw_file(ok, eight);
  truncated.pop_back();
  rejects(truncated, "outside the data buffer of 7 bytes");
  rejects({1, 2, 3}, "too short");
  std::vector<uint8_t> long_header = raw_file(ok, eight);
  long_header[0] = 0xff, long_header[1] = 0xff;
  rejects(long_header, "header length 65535 exceeds");
  expect_error([&] { read_safetensors(dir.file("missing.safetensors")); }, {"missing.safetensors", "cannot open"});

  // Malformed JSON.
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", eight),
          "expected ',' or '}' before the end of the header");
  rejects(raw_file(ok + "x", eight), "unexpected text after the header");
  rejects(raw_file(R"({"a":{"dtype":"F32,"shape":[2],"data_offsets":[0,8]}})", eight), "expected ',' or '}'");
  rejects(raw_file(R"({"a" {"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight), "expected ':'");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,08]}})", eight), "leading zero");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight), "non-negative integer");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", eight), "not a fraction");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,99999999999999999999]}})", eight), "too large");
  rejects(raw_file(R"({"a":{"dtype":"F\q","shape":[2],"data_offsets":[0,8]}})", eight), "unknown escape");
  rejects(raw_file(R"({"a":{"dtype":"\ud800","shape":[2],"data_offsets":[0,8]}})", eight), "unpaired high surrogate");
  rejects(raw_file(R"({"a":{"dtype":"\udc00","shape":[2],"data_offsets":[0,8]}})", eight), "unpaired low surrogate");
  rejects(raw_file("{\"a\":{\"dtype\":\"F\t32\",\"shape\":[2],\"data_offsets\":[0,8]}}", eight), "control character");
  rejects(raw_file("{\"\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", eight), "not valid UTF-8");
  rejects(raw_file(R"([1,2])", {}), "expected '{'");
  rejects(
      raw_file(
          R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
          eight),
      "duplicate key 'a'");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":"x"}})", eight),
          "unknown key 'extra' in tensor 'a'");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2]}})", eight), "needs \"dtype\", \"shape\" and \"data_offsets\"");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", eight), "two entries");
  rejects(raw_file(R"({"__metadata__":{"n":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight),
          "metadata value of 'n' is not a string");

  // Inconsistent tensors.
  rejects(raw_file(R"({"a":{"dtype":"Q8","shape":[8],"data_offsets":[0,8]}})", eight), "unknown dtype 'Q8'");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight), "needs 12");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", eight), "outside the data buffer");
  rejects(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", eight), "outside the data buffer");
  const std::vector<uint8_t> twelve(12, 2);
  rejects(
      raw_file(
          R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
          twelve),
      "tensor 'b' overlaps tensor 'a'");
  rejects(
      raw_file(
          R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
          twelve),
      "unused bytes [4, 8)");
  rejects(raw_file(ok, twelve), "the tensors cover 8 bytes of a data buffer of 12 bytes");
}

// Every truncation of a valid file, and every byte of its length prefix and header replaced by
// each of several values, must either read (a change the format allows, such as another dtype of
// the same size or a changed name) or throw sp::Error naming the file: never another exception, a
// crash or a read outside the file's bytes (the AddressSanitizer build runs this too). What does
// read must still be consistent: every tensor's bytes as its dtype and shape say.
TEST(Safetensors, EveryCorruptionOfAValidFileReadsOrIsRejectedByName) {
  TempDir dir;
  const std::string good = dir.file("good.safetensors"), bad = dir.file("bad.safetensors");
  write_safetensors(good,
                    {record("conv1.weight", "F32", {2, 3}, 24), record("bn.gamma", "BF16", {4}, 8),
                     record("steps", "I64", {1}, 8), record("scalar", "F32", {}, 4), record("x\"y", "U8", {3}, 3)},
                    {{"epoch", "3"}, {"note", "\u00fc\t"}});
  const std::vector<uint8_t> bytes = read_bytes(good);
  uint64_t header = 0;
  for (int i = 0; i < 8; ++i) header |= uint64_t(bytes[size_t(i)]) << (8 * i);
  ASSERT_LT(8 + header, bytes.size());
  int read_ok = 0, rejected = 0;
  const auto attempt = [&](const std::vector<uint8_t>& mutated, const std::string& what) {
    write_bytes(bad, mutated);
    try {
      const SafetensorsFile f = read_safetensors(bad);
      for (const TensorRecord& t : f.tensors) {
        size_t numel = 1;
        for (const int64_t d : t.shape) numel *= size_t(d);
        ASSERT_EQ(t.data.size(), numel * safetensors_dtype_size(t.dtype)) << what << ": tensor '" << t.name << "'";
      }
      ++read_ok;
    } catch (const Error& e) {
      ASSERT_NE(std::string(e.what()).find(bad), std::string::npos) << what << ": " << e.what();
      ++rejected;
    } catch (const std::exception& e) {
      FAIL() << what << ": not an sp::Error: " << e.what();
    }
  };
  for (size_t n = 0; n < bytes.size(); ++n)
    attempt(std::vector<uint8_t>(bytes.begin(), bytes.begin() + std::ptrdiff_t(n)),
            "truncated to " + std::to_string(n) + " bytes");
  if (HasFatalFailure()) return;
  EXPECT_EQ(read_ok, 0) << "a truncated file read";
  const uint8_t values[] = {0x00, 0x01, 0x7f, 0x80, 0xff, '"', '\\', '{', '}',
                            '[',  ']',  ',',  ':',  '-',  '0', '9',  'e', ' '};
  for (size_t at = 0; at < 8 + header; ++at) {
    for (const uint8_t v : values) {
      if (bytes[at] == v) continue;
      std::vector<uint8_t> mutated = bytes;
      mutated[at] = v;
      attempt(mutated, "byte " + std::to_string(at) + " set to " + std::to_string(int(v)));
    }
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(read_ok, 0) << "no mutation read: the check of what does read was never made";
}

TEST(Safetensors, WriterRejectsInvalidRecords) {
  TempDir dir;
  const std::string path = dir.file("out.safetensors");
  expect_error(
      [&] {
        write_safetensors(path, {record("a", "F32", {2}, 8), record("a", "U8", {1}, 1)}, {});
      },
      {path, "duplicate tensor name 'a'"});
  expect_error([&] { write_safetensors(path, {record("a", "F32", {2}, 7)}, {}); },
               {path, "tensor 'a' has 7 bytes of data for F32 [2]"});
  expect_error([&] { write_safetensors(path, {record("a", "F31", {2}, 8)}, {}); }, {path, "unknown dtype 'F31'"});
  expect_error([&] { write_safetensors(path, {record("__metadata__", "U8", {1}, 1)}, {}); },
               {path, "invalid tensor name"});
  expect_error([&] { write_safetensors(path, {}, {{"k", "\xc3"}}); }, {path, "not valid UTF-8"});
  EXPECT_TRUE(dir.entries().empty());
  EXPECT_EQ(safetensors_dtype_size("BF16"), 2u);
  EXPECT_THROW(safetensors_dtype_size("bf16"), Error);
}

// Threads of one process (the runs of a sweep) saving at once each have their own temporary file:
// with one per process, a rename found the other's already gone, and a file could mix both.
TEST(Safetensors, ThreadsWritingOnePathAtOnceEachLeaveAWholeFile) {
  TempDir dir;
  const std::string path = dir.file("shared.safetensors");
  std::atomic<int> failures{0};
  auto writer = [&](uint8_t fill) {
    for (int i = 0; i < 100; ++i) {
      try {
        TensorRecord r = record("t", "U8", {4096}, 4096);
        std::fill(r.data.begin(), r.data.end(), fill);
        write_safetensors(path, {r}, {{"by", std::to_string(fill)}});
      } catch (const std::exception&) {
        ++failures;
      }
    }
  };
  std::thread a(writer, uint8_t(1)), b(writer, uint8_t(2));
  a.join();
  b.join();
  EXPECT_EQ(failures.load(), 0);
  const SafetensorsFile f = read_safetensors(path);
  ASSERT_EQ(f.tensors.size(), 1u);
  const uint8_t by = uint8_t(std::stoi(f.metadata.at("by")));
  EXPECT_TRUE(std::all_of(f.tensors[0].data.begin(), f.tensors[0].data.end(), [&](uint8_t v) { return v == by; }))
      << "a file mixing both writers";
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"shared.safetensors"}) << "a temporary file left behind";
}

TEST(Safetensors, AtomicWriteReplacesTheFileAndLeavesNoTemporary) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_safetensors(path, {record("old", "U8", {3}, 3)}, {{"v", "1"}});
  write_safetensors(path, {record("new", "F32", {1}, 4)}, {{"v", "2"}});
  const SafetensorsFile f = read_safetensors(path);
  ASSERT_EQ(f.tensors.size(), 1u);
  EXPECT_EQ(f.tensors[0].name, "new");
  EXPECT_EQ(f.metadata.at("v"), "2");
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"model.safetensors"});

  // A write that fails at the rename (the target is a directory) removes its temporary file.
  fs::create_directory(dir.path / "taken");
  expect_error([&] { write_safetensors(dir.file("taken"), {record("x", "U8", {1}, 1)}, {}); },
               {"taken.tmp." + std::to_string(::getpid()), "renaming"});
  std::vector<std::string> entries = dir.entries();
  std::sort(entries.begin(), entries.end());
  EXPECT_EQ(entries, (std::vector<std::string>{"model.safetensors", "taken"}));
  // A file name without a directory part is written in the working directory.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path);
  write_safetensors("plain.safetensors", {}, {});
  fs::current_path(cwd);
  EXPECT_TRUE(fs::is_regular_file(dir.path / "plain.safetensors"));
}

// The temporary file is created exclusively and never through a link: names already taken (a
// writer of another PID namespace with this pid, a stale file, a planted link) are left alone
// and passed over.
TEST(Safetensors, TheTemporaryFileIsNewAndNeverFollowsALink) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors"), victim = dir.file("victim");
  write_bytes(victim, {1, 2, 3});
  const std::string prefix = path + ".tmp." + std::to_string(::getpid()) + ".";
  constexpr int kTaken = 3000;  // more than the saves this test process can have made before
  for (int n = 0; n < kTaken; ++n)
    if (n % 2 == 0)
      fs::create_symlink(victim, prefix + std::to_string(n));
    else
      write_bytes(prefix + std::to_string(n), {9});
  write_safetensors(path, {record("t", "U8", {5}, 5)}, {{"v", "1"}});
  EXPECT_EQ(read_bytes(victim), (std::vector<uint8_t>{1, 2, 3})) << "written through a link";
  EXPECT_FALSE(fs::is_symlink(path));
  const SafetensorsFile f = read_safetensors(path);
  ASSERT_EQ(f.tensors.size(), 1u);
  EXPECT_EQ(f.metadata.at("v"), "1");
  EXPECT_EQ(dir.entries().size(), size_t(kTaken + 2)) << "a name taken was removed, or a temporary left";
  EXPECT_EQ(read_bytes(prefix + "1"), std::vector<uint8_t>{9});
}

// A FIFO at the path is refused at once (opening it for reading would wait for a writer).
TEST(Safetensors, AFifoIsRefusedNotWaitedOn) {
  TempDir dir;
  const std::string fifo = dir.file("pipe.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  expect_error([&] { read_safetensors(fifo); }, {"pipe.safetensors", "not a regular file"});
}

// The CRC-32 that checkpoints record of their tensors: zlib's (the check value of the catalogue
// of CRCs for "123456789"), and continued over pieces as over the whole.
TEST(Safetensors, Crc32IsZlibsAndContinuesOverPieces) {
  const std::string digits = "123456789";
  EXPECT_EQ(crc32(digits.data(), digits.size()), 0xCBF43926u);
  EXPECT_EQ(crc32(digits.data() + 4, 5, crc32(digits.data(), 4)), 0xCBF43926u);
  EXPECT_EQ(crc32(nullptr, 0), 0u);
  const std::string fox = "The quick brown fox jumps over the lazy dog";
  EXPECT_EQ(crc32(fox.data(), fox.size()), 0x414FA339u);
}

TEST(Safetensors, TensorHelpersRoundTripAndCheckShapes) {
  TempDir dir;
  Tensor w = Tensor::empty({2, 3}, DType::F32), h = Tensor::empty({4}, DType::BF16);
  Tensor n = Tensor::empty({3}, DType::I32), m = Tensor::empty({2, 2}, DType::U8), s = Tensor::empty({}, DType::F32);
  for (int64_t i = 0; i < 6; ++i) w.at<float>(i) = 0.5f * float(i) - 1.f;
  for (int64_t i = 0; i < 4; ++i) h.at<uint16_t>(i) = uint16_t(0x3f80 + i);
  for (int64_t i = 0; i < 3; ++i) n.at<int32_t>(i) = int32_t(-7 * i);
  for (int64_t i = 0; i < 4; ++i) m.at<uint8_t>(i) = uint8_t(250 + i);
  s.at<float>(0) = 3.25f;
  const std::string path = dir.file("t.safetensors");
  write_safetensors(path,
                    {tensor_record("w", w), tensor_record("h", h), tensor_record("n", n), tensor_record("m", m),
                     tensor_record("s", s)},
                    {});
  const SafetensorsFile f = read_safetensors(path);
  EXPECT_EQ(f.find("w")->dtype, "F32");
  EXPECT_EQ(f.find("h")->dtype, "BF16");
  EXPECT_EQ(f.find("n")->dtype, "I32");
  EXPECT_EQ(f.find("m")->dtype, "U8");
  EXPECT_EQ(f.find("s")->shape, std::vector<int64_t>{});

  Tensor w2 = Tensor::empty({2, 3}, DType::F32), h2 = Tensor::empty({4}, DType::BF16);
  Tensor n2 = Tensor::empty({3}, DType::I32), m2 = Tensor::empty({2, 2}, DType::U8), s2 = Tensor::empty({}, DType::F32);
  copy_record_to_tensor(*f.find("w"), w2);
  copy_record_to_tensor(*f.find("h"), h2);
  copy_record_to_tensor(*f.find("n"), n2);
  copy_record_to_tensor(*f.find("m"), m2);
  copy_record_to_tensor(*f.find("s"), s2);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(w2.at<float>(i), w.at<float>(i));
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(h2.at<uint16_t>(i), h.at<uint16_t>(i));
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(n2.at<int32_t>(i), n.at<int32_t>(i));
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(m2.at<uint8_t>(i), m.at<uint8_t>(i));
  EXPECT_EQ(s2.at<float>(0), 3.25f);

  Tensor wrong_shape = Tensor::empty({3, 2}, DType::F32), wrong_dtype = Tensor::empty({2, 3}, DType::BF16);
  expect_error<ShapeError>([&] { copy_record_to_tensor(*f.find("w"), wrong_shape); },
                           {"'w'", "F32 [2, 3]", "f32[3, 2]"});
  expect_error<ShapeError>([&] { copy_record_to_tensor(*f.find("w"), wrong_dtype); },
                           {"'w'", "F32 [2, 3]", "bf16[2, 3]"});
  EXPECT_THROW(tensor_record("u", Tensor()), Error);
}

}  // namespace
