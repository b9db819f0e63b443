# The C/C++ library as installed by `cmake --install`: libkvfold (shared, kvfold::kvfold) and the
# static archive (kvfold::kvfold_static), the headers, a CMake package (find_package(kvfold)) and a
# pkg-config file (kvfold.pc).
include(CMakePackageConfigHelpers)

string(REGEX MATCH "^([0-9]+)\\.([0-9]+)" _ "${KVFOLD_VERSION}")
# Before 1.0 a minor release may change the ABI, so the soname carries major.minor.
if(CMAKE_MATCH_1 EQUAL 0)
  set(KVFOLD_SOVERSION "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
else()
  set(KVFOLD_SOVERSION "${CMAKE_MATCH_1}")
endif()

add_library(kvfold SHARED $<TARGET_OBJECTS:kvfold_objects>)
kvfold_usage(kvfold)
target_compile_definitions(kvfold INTERFACE KVFOLD_SHARED)
set_target_properties(kvfold PROPERTIES VERSION ${KVFOLD_VERSION} SOVERSION ${KVFOLD_SOVERSION})

# Same file name as the shared library where the platform allows it (libkvfold.a beside
# libkvfold.so); on Windows kvfold.lib is the shared library's import library.
set_target_properties(kvfold_core PROPERTIES EXPORT_NAME kvfold_static)
if(NOT WIN32)
  set_target_properties(kvfold_core PROPERTIES OUTPUT_NAME kvfold)
else()
  set_target_properties(kvfold_core PROPERTIES OUTPUT_NAME kvfold_static)
endif()

install(TARGETS kvfold kvfold_core EXPORT kvfoldTargets
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES
  ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include/kvfold/kvfold.h
  ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include/kvfold/kvfold.hpp
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kvfold)

set(_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/kvfold)
install(EXPORT kvfoldTargets NAMESPACE kvfold:: DESTINATION ${_cmake_dir})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/kvfoldConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/kvfoldConfig.cmake INSTALL_DESTINATION ${_cmake_dir})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/kvfoldConfigVersion.cmake
  VERSION ${KVFOLD_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/kvfoldConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/kvfoldConfigVersion.cmake
  DESTINATION ${_cmake_dir})

# pkg-config: paths relative to the .pc file, so the install prefix can change at install time.
set(_pc_dir ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
file(RELATIVE_PATH KVFOLD_PC_PREFIX /root/${_pc_dir} /root)
string(REGEX REPLACE "/$" "" KVFOLD_PC_PREFIX "${KVFOLD_PC_PREFIX}")
file(RELATIVE_PATH KVFOLD_PC_LIBDIR /root /root/${CMAKE_INSTALL_LIBDIR})
file(RELATIVE_PATH KVFOLD_PC_INCLUDEDIR /root /root/${CMAKE_INSTALL_INCLUDEDIR})
configure_file(${CMAKE_CURRENT_LIST_DIR}/kvfold.pc.in ${CMAKE_CURRENT_BINARY_DIR}/kvfold.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/kvfold.pc DESTINATION ${_pc_dir})
