#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <set>

#include "kernels/common/error.h"

// Tensor memory is written and read as is, and the format is little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace sp::io {

namespace {

// The reference implementation's limit; a larger length means a corrupt or foreign file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// 0 for an unknown dtype name.
size_t dtype_size_or_zero(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {{"F32", 4}, {"BF16", 2}, {"F16", 2}, {"I64", 8},
                                                      {"I32", 4}, {"U8", 1},   {"F64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

bool valid_utf8(const std::string& s) {
  static const uint32_t kMinCodePoint[5] = {0, 0, 0x80, 0x800, 0x10000};  // overlong forms are invalid
  size_t i = 0;
  while (i < s.size()) {
    const auto c = uint8_t(s[i]);
    int len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1Fu;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0Fu;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07u;
    } else {
      return false;
    }
    if (i + size_t(len) > s.size()) return false;
    for (int k = 1; k < len; ++k) {
      const auto d = uint8_t(s[i + size_t(k)]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3Fu);
    }
    if (cp < kMinCodePoint[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += size_t(len);
  }
  return true;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::string json_string(const std::string& s) {
  static const char* kHex = "0123456789abcdef";
  std::string out = "\"";
  for (char ch : s) {
    const auto c = uint8_t(ch);
    switch (ch) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::string json_int_array(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
  return out + "]";
}

// numel * element size, or false on overflow of int64.
bool byte_size(const std::vector<int64_t>& shape, size_t elem, int64_t* bytes) {
  int64_t n = int64_t(elem);
  for (int64_t d : shape) {
    if (d < 0 || (d != 0 && n > INT64_MAX / d)) return false;
    n *= d;
  }
  *bytes = n;
  return true;
}

// A tensor entry of the header, before its data is read.
struct Entry {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// A strict recursive-descent parser for exactly the JSON a safetensors header holds: one object
// whose members are objects of strings and arrays of non-negative integers.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : text_(text), path_(path) {}

  void parse(std::vector<Entry>* entries, std::map<std::string, std::string>* metadata) {
    parse_object([&](const std::string& key) {
      if (key == "__metadata__") {
        parse_object([&](const std::string& k) {
          if (!peek('"')) fail("metadata value of '" + k + "' is not a string");
          (*metadata)[k] = parse_string();
        });
        return;
      }
      Entry e;
      e.name = key;
      bool has_dtype = false, has_shape = false;
      std::vector<uint64_t> offsets;
      parse_object([&](const std::string& k) {
        if (k == "dtype") {
          e.dtype = parse_string();
          has_dtype = true;
        } else if (k == "shape") {
          for (uint64_t d : parse_uint_array()) {
            if (d > uint64_t(INT64_MAX)) fail("dimension too large in the shape of '" + key + "'");
            e.shape.push_back(int64_t(d));
          }
          has_shape = true;
        } else if (k == "data_offsets") {
          offsets = parse_uint_array();
          if (offsets.size() != 2) fail("data_offsets of '" + key + "' must have two entries");
        } else {
          fail("unknown key '" + k + "' in tensor '" + key + "'");
        }
      });
      if (!has_dtype || !has_shape || offsets.empty())
        fail("tensor '" + key + "' needs \"dtype\", \"shape\" and \"data_offsets\"");
      e.begin = offsets[0];
      e.end = offsets[1];
      entries->push_back(std::move(e));
    });
    skip_ws();
    if (pos_ != text_.size()) fail("unexpected text after the header object");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(detail::concat("safetensors file '", path_, "': malformed header at byte ", pos_, ": ", what));
  }

  void skip_ws() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }

  bool peek(char c) {
    skip_ws();
    return pos_ < text_.size() && text_[pos_] == c;
  }

  void expect(char c) {
    if (!peek(c)) fail_expected(detail::concat("'", c, "'"));
    ++pos_;
  }

  [[noreturn]] void fail_expected(const std::string& what) const {
    fail("expected " + what + (pos_ < text_.size() ? "" : " before the end of the header"));
  }

  // After an element of an object or array: true at ',' (more follow), false at `close`.
  bool next_element(char close) {
    if (peek(',')) {
      ++pos_;
      return true;
    }
    if (!peek(close)) fail_expected(detail::concat("',' or '", close, "'"));
    ++pos_;
    return false;
  }

  // Calls member(key) with pos_ at the value of each member; rejects duplicate keys.
  template <typename F>
  void parse_object(F&& member) {
    expect('{');
    if (peek('}')) {
      ++pos_;
      return;
    }
    std::set<std::string> seen;
    for (;;) {
      if (!peek('"')) fail("expected a string key");
      const std::string key = parse_string();
      if (!seen.insert(key).second) fail("duplicate key '" + key + "'");
      expect(':');
      member(key);
      if (!next_element('}')) return;
    }
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > text_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f')
        v |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        v |= uint32_t(c - 'A' + 10);
      else
        fail("bad hex digit in \\u escape");
    }
    return v;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (pos_ >= text_.size()) fail("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return out;
      if (uint8_t(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated string");
      switch (text_[pos_++]) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (text_.compare(pos_, 2, "\\u") != 0) fail("unpaired high surrogate in \\u escape");
            pos_ += 2;
            const uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired high surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          --pos_;
          fail("unknown escape in a string");
      }
    }
  }

  uint64_t parse_uint() {
    skip_ws();
    const size_t start = pos_;
    uint64_t v = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const uint64_t d = uint64_t(text_[pos_] - '0');
      if (v > (UINT64_MAX - d) / 10) fail("integer too large");
      v = v * 10 + d;
      ++pos_;
    }
    if (pos_ == start) fail("expected a non-negative integer");
    if (text_[start] == '0' && pos_ - start > 1) fail("leading zero in an integer");
    if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E'))
      fail("expected an integer, not a fraction");
    return v;
  }

  std::vector<uint64_t> parse_uint_array() {
    std::vector<uint64_t> v;
    expect('[');
    if (peek(']')) {
      ++pos_;
      return v;
    }
    for (;;) {
      v.push_back(parse_uint());
      if (!next_element(']')) return v;
    }
  }

  const std::string& text_;
  const std::string& path_;
  size_t pos_ = 0;
};

// Closes a descriptor on every exit path.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Removes the temporary file of a write that failed before its rename (path cleared after).
struct TempFileRemover {
  std::string path;
  ~TempFileRemover() {
    if (!path.empty()) ::unlink(path.c_str());
  }
};

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) throw Error("safetensors: writing '" + path + "' failed: " + std::strerror(errno));
    p += w;
    n -= size_t(w);
  }
}

// Reads exactly n bytes at `offset`; false at end of file.
bool read_at(int fd, void* data, size_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, off_t(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw Error("safetensors file '" + path + "': read failed: " + std::strerror(errno));
    if (r == 0) return false;
    p += r;
    n -= size_t(r);
    offset += uint64_t(r);
  }
  return true;
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::BF16:
      return "BF16";
    case DType::I32:
      return "I32";
    case DType::U8:
      return "U8";
  }
  return "?";
}

}  // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  const size_t n = dtype_size_or_zero(dtype);
  if (n == 0) throw Error("unknown safetensors dtype '" + dtype + "' (known: F32, BF16, F16, I64, I32, U8, F64)");
  return n;
}

const TensorRecord* SafetensorsFile::find(const std::string& name) const {
  for (const TensorRecord& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

void write_safetensors(const std::string& path, const std::vector<TensorRecord>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  auto bad = [&](const std::string& what) { throw Error("safetensors: cannot write '" + path + "': " + what); };
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      if (!valid_utf8(k) || !valid_utf8(v)) bad("metadata entry '" + k + "' is not valid UTF-8");
      header += (first ? "" : ",") + json_string(k) + ":" + json_string(v);
      first = false;
    }
    header += "}";
  }
  // The data in order of element size, largest first (stable otherwise): the buffer starts
  // 8-byte aligned, so every tensor's data is aligned to its element size, whatever the sizes
  // of those before it (PyTorch views the bytes as the dtype).
  std::vector<const TensorRecord*> order;
  for (const TensorRecord& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorRecord* a, const TensorRecord* b) {
    return dtype_size_or_zero(a->dtype) > dtype_size_or_zero(b->dtype);
  });
  std::set<std::string> names;
  int64_t offset = 0;
  for (const TensorRecord* tp : order) {
    const TensorRecord& t = *tp;
    if (t.name.empty() || t.name == "__metadata__" || !valid_utf8(t.name)) bad("invalid tensor name '" + t.name + "'");
    if (!names.insert(t.name).second) bad("duplicate tensor name '" + t.name + "'");
    const size_t elem = dtype_size_or_zero(t.dtype);
    if (elem == 0) bad("tensor '" + t.name + "' has unknown dtype '" + t.dtype + "'");
    int64_t bytes = 0;
    if (!byte_size(t.shape, elem, &bytes) || bytes != int64_t(t.data.size()))
      bad(detail::concat("tensor '", t.name, "' has ", t.data.size(), " bytes of data for ", t.dtype, " ",
                         shape_str(t.shape)));
    header += (header.size() > 1 ? "," : "") + json_string(t.name) + ":{\"dtype\":" + json_string(t.dtype) +
              ",\"shape\":" + json_int_array(t.shape) +
              ",\"data_offsets\":" + json_int_array({offset, offset + bytes}) + "}";
    offset += bytes;
  }
  header += "}";
  // Spaces up to a multiple of 8 so that the data buffer starts 8-byte aligned.
  header.append((8 - header.size() % 8) % 8, ' ');
  uint8_t prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = uint8_t(uint64_t(header.size()) >> (8 * i));

  // Unique within the process too: runs of one sweep may write at once (into other files, but
  // two threads saving one path must not share a temporary file either). Created exclusively and
  // never through a link: a name taken (by a writer of another PID namespace with our pid, or a
  // stale file or link) is another's, left alone, and the next is tried.
  static std::atomic<uint64_t> saves{0};
  constexpr int kNamesTried = 1 << 16;
  TempFileRemover remover;  // declared before `out`: the descriptor is closed before the unlink
  Fd out;
  std::string tmp;
  for (int attempt = 0; out.fd < 0; ++attempt) {
    tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(saves++);
    out.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (out.fd < 0 && (errno != EEXIST || attempt + 1 == kNamesTried))
      throw Error("safetensors: cannot create '" + tmp + "': " + std::strerror(errno));
  }
  remover.path = tmp;
  write_all(out.fd, prefix, sizeof prefix, tmp);
  write_all(out.fd, header.data(), header.size(), tmp);
  for (const TensorRecord* t : order) write_all(out.fd, t->data.data(), t->data.size(), tmp);
  // The data must be on disk before the rename makes it visible under the final name.
  if (::fsync(out.fd) != 0) throw Error("safetensors: fsync of '" + tmp + "' failed: " + std::strerror(errno));
  const int fd = out.fd;
  out.fd = -1;
  if (::close(fd) != 0) throw Error("safetensors: closing '" + tmp + "' failed: " + std::strerror(errno));
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    throw Error("safetensors: renaming '" + tmp + "' to '" + path + "' failed: " + std::strerror(errno));
  remover.path.clear();
  // Persist the rename itself (the directory entry).
  const std::string dir = parent_dir(path);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) throw Error("safetensors: cannot open directory '" + dir + "': " + std::strerror(errno));
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  // Some file systems (FUSE, network mounts) cannot sync a directory: the file is complete
  // and renamed all the same, so only other failures are errors.
  if (rc != 0 && err != EINVAL && err != ENOTSUP && err != EOPNOTSUPP)
    throw Error("safetensors: fsync of directory '" + dir + "' failed: " + std::strerror(err));
}

SafetensorsFile read_safetensors(const std::string& path) {
  auto bad = [&](const std::string& what) { throw Error("safetensors file '" + path + "': " + what); };
  Fd file;
  // Without blocking: opening a FIFO for reading would wait for a writer (S_ISREG refuses it).
  file.fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (file.fd < 0) bad(std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (::fstat(file.fd, &st) != 0 || !S_ISREG(st.st_mode)) bad("not a regular file");
  const uint64_t file_size = uint64_t(st.st_size);

  uint8_t prefix[8];
  if (file_size < 8 || !read_at(file.fd, prefix, 8, 0, path))
    bad(detail::concat("file of ", file_size, " bytes is too short for the 8-byte header length"));
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(prefix[i]) << (8 * i);
  if (header_len > file_size - 8)
    bad(detail::concat("header length ", header_len, " exceeds the ", file_size - 8, " bytes after the length field"));
  if (header_len > kMaxHeaderBytes) bad(detail::concat("header length ", header_len, " exceeds ", kMaxHeaderBytes));
  std::string header(size_t(header_len), '\0');
  if (!read_at(file.fd, header.data(), header.size(), 8, path)) bad("file shrank while reading the header");
  if (!valid_utf8(header)) bad("header is not valid UTF-8");

  SafetensorsFile out;
  std::vector<Entry> entries;
  HeaderParser(header, path).parse(&entries, &out.metadata);

  const uint64_t data_size = file_size - 8 - header_len;
  for (const Entry& e : entries) {
    const size_t elem = dtype_size_or_zero(e.dtype);
    if (elem == 0) bad("tensor '" + e.name + "' has unknown dtype '" + e.dtype + "'");
    int64_t bytes = 0;
    if (!byte_size(e.shape, elem, &bytes)) bad("tensor '" + e.name + "' has an oversized shape");
    if (e.end < e.begin || e.end > data_size)
      bad(detail::concat("tensor '", e.name, "' has data_offsets [", e.begin, ", ", e.end,
                         "] outside the data buffer of ", data_size, " bytes"));
    if (e.end - e.begin != uint64_t(bytes))
      bad(detail::concat("tensor '", e.name, "' spans ", e.end - e.begin, " bytes but ", e.dtype, " ",
                         shape_str(e.shape), " needs ", bytes));
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  // The tensors must tile the data buffer: no overlap, no gap, nothing after the last one.
  uint64_t covered = 0;
  const std::string* prev = nullptr;
  for (const Entry& e : entries) {
    if (e.begin < covered) bad("tensor '" + e.name + "' overlaps tensor '" + *prev + "'");
    if (e.begin > covered)
      bad(detail::concat("unused bytes [", covered, ", ", e.begin, ") of the data buffer before tensor '", e.name,
                         "'"));
    covered = e.end;
    prev = &e.name;
  }
  if (covered != data_size)
    bad(detail::concat("the tensors cover ", covered, " bytes of a data buffer of ", data_size, " bytes"));

  for (Entry& e : entries) {
    TensorRecord r;
    r.name = std::move(e.name);
    r.dtype = std::move(e.dtype);
    r.shape = std::move(e.shape);
    r.data.resize(size_t(e.end - e.begin));
    if (!read_at(file.fd, r.data.data(), r.data.size(), 8 + header_len + e.begin, path))
      bad("file shrank while reading tensor '" + r.name + "'");
    out.tensors.push_back(std::move(r));
  }
  return out;
}

TensorRecord tensor_record(const std::string& name, const Tensor& t) {
  SP_CHECK(t.defined() && t.device().is_cpu(), "tensor_record('", name, "'): needs a CPU tensor, got ",
           t.defined() ? t.str() : "an undefined tensor");
  TensorRecord r;
  r.name = name;
  r.dtype = safetensors_dtype(t.dtype());
  r.shape = t.shape();
  const auto* p = static_cast<const uint8_t*>(t.raw_data());
  r.data.assign(p, p + t.nbytes());
  return r;
}

void copy_record_to_tensor(const TensorRecord& record, const Tensor& dst) {
  SP_CHECK(dst.defined() && dst.device().is_cpu(), "copy_record_to_tensor('", record.name,
           "'): needs a CPU tensor, got ", dst.defined() ? dst.str() : "an undefined tensor");
  if (record.dtype != safetensors_dtype(dst.dtype()) || record.shape != dst.shape())
    throw ShapeError(detail::concat("safetensors tensor '", record.name, "' is ", record.dtype, " ",
                                    shape_str(record.shape), " but the destination is ", dst.str()));
  SP_CHECK(record.data.size() == dst.nbytes(), "safetensors tensor '", record.name, "' has ", record.data.size(),
           " bytes, expected ", dst.nbytes());
  std::memcpy(dst.raw_data(), record.data.data(), record.data.size());
}

uint32_t crc32(const void* data, size_t size, uint32_t crc) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

}  // namespace sp::io
